"""The compiler writes manifests the typed schema accepts, and the schema keeps every key (round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgeml
from edgeml.runtime.artifact import read_manifest
from edgeml.runtime.manifest import Manifest

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_a_compiled_manifest_round_trips_through_the_schema(tmp_path):
    if not (DIGITS / "digits.onnx").is_file():
        pytest.skip("examples/digits/digits.onnx is missing; run python examples/digits/train.py")
    out = edgeml.compile(DIGITS / "digits.onnx", target="x86_64", output=tmp_path / "d.edgepkg",
                         backend="onnxruntime", precision="fp32", eval=DIGITS / "eval.npz", cache_dir=False,
                         benchmark=False)
    manifest = read_manifest(out)
    spec = Manifest.from_dict(manifest)
    assert spec.to_dict() == manifest                      # nothing dropped, nothing renamed
    assert spec.selftest is not None and spec.selftest.file in spec.files
    assert spec.backend.entrypoint in spec.files and spec.inputs[0].shape[0] is None
    assert {"candidates", "provenance", "accuracy", "selection", "drift_profile"} <= set(spec.info)
    model = edgeml.load(out, cache_dir=tmp_path / "c")
    assert model.spec == spec and model.selftest().passed
    model.close()
