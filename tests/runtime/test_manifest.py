"""Issue 9 row 9: one typed manifest schema; every bad field is ONE ArtifactError naming the field path."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from artifact_helpers import base_manifest, craft, listing, tiny_onnx

import edgeml
from edgeml.errors import ArtifactError, DataError, summarize_names
from edgeml.runtime.artifact import read_manifest, verify_archive, write_artifact
from edgeml.runtime.dtypes import DATATYPE_TO_DTYPE, datatype_of, dtype_of, numpy_dtype
from edgeml.runtime.manifest import MAX_JSON_DEPTH, Manifest

MODEL = {"model/model.onnx": tiny_onnx()}


def full(**over):
    m = base_manifest(files=listing(MODEL))
    m.update(over)
    return m


def refused(tmp_path, manifest=None, raw=None) -> str:
    """Load a crafted artifact; return the one error line it must give."""
    art = craft(tmp_path / "bad.edgepkg", manifest, MODEL, raw_manifest=raw)
    with pytest.raises(ArtifactError) as info:
        edgeml.load(art, cache_dir=tmp_path / "c")
    assert "Traceback" not in str(info.value)
    assert not list((tmp_path / "c").rglob("*.onnx")), "a refused artifact must not be extracted"
    return info.value.message


@pytest.mark.parametrize("raw, match", [
    (b"null", "expected a JSON object, got None"),
    (b"42", "expected a JSON object, got 42"),
    (b"[1, 2]", "expected a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"name": "a", "name": "b"}', "duplicate key"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|nested deeper"),
    (json.dumps({"x": json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))}).encode(),
     "nested deeper than 64"),
])
def test_manifest_that_is_not_an_object_is_one_clear_error(tmp_path, raw, match):
    import re

    assert re.search(match, refused(tmp_path, raw=raw))


@pytest.mark.parametrize("change, field, match", [
    ({"files": {"model/model.onnx": "abc"}}, "files['model/model.onnx']", "expected an object {sha256, size}"),
    ({"files": {"model/model.onnx": {"sha256": "x", "size": 1}}}, "files['model/model.onnx'].sha256", "64 lowercase hex"),
    ({"files": {"model/model.onnx": {"sha256": "0" * 64, "size": -1}}}, "files['model/model.onnx'].size", "integer"),
    ({"files": ["model/model.onnx"]}, "files", "expected an object"),
    ({"required_features": "sse4_2"}, "required_features", "expected a list"),
    ({"required_features": [1]}, "required_features[0]", "non-empty string"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": "abc"}]}, "inputs[0].shape", "got 'abc'"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [None, "4"]}]}, "inputs[0].shape[1]", "integer"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": [None, -3]}]}, "inputs[0].shape[1]", "integer"),
    ({"inputs": [{"name": "x", "dtype": "complex128", "shape": [None, 4]}]}, "inputs[0].dtype", "one of"),
    ({"outputs": [{"name": "y", "dtype": "FP32", "shape": [None, 3]}]}, "outputs[0].dtype", "got 'FP32'"),
    ({"inputs": []}, "inputs", "a list of 1 to"),
    ({"inputs": None}, "inputs", "a list of 1 to"),
    ({"precision": "fp8"}, "precision", "one of"),
    ({"name": ""}, "name", "non-empty string"),
    ({"version": 2}, "version", "non-empty string"),
    ({"backend": "onnxruntime"}, "backend", "expected an object"),
    ({"backend": {"name": "onnxruntime", "entrypoint": "model/model.onnx", "options": []}}, "backend.options",
     "expected an object"),
    ({"runtime": {"threads": 100000}}, "runtime.threads", "from 0 to 4096"),
    ({"runtime": {"threads": -1}}, "runtime.threads", "from 0 to 4096"),
    ({"runtime": {"threads": "8"}}, "runtime.threads", "from 0 to 4096"),
    ({"runtime": {"threads": True}}, "runtime.threads", "from 0 to 4096"),
    ({"runtime": 3}, "runtime", "expected an object"),
    ({"selftest": {"file": "selftest/golden.npz"}}, "selftest.file", "not a member listed in 'files'"),
    ({"selftest": {"file": "model/model.onnx", "rtol": "loose"}}, "selftest.rtol", "number"),
])
def test_bad_field_is_refused_naming_its_path(tmp_path, change, field, match):
    message = refused(tmp_path, full(**change))
    assert f"field '{field}'" in message and match in message, message
    assert "\n" not in message


def test_missing_keys_and_schema_version_are_named(tmp_path):
    m = full()
    del m["inputs"]
    assert "lacks required keys ['inputs']" in refused(tmp_path, m)
    assert "schema_version 2" in refused(tmp_path, full(schema_version=2))
    assert "schema_version True" in refused(tmp_path, full(schema_version=True))


@pytest.mark.parametrize("raw, match", [
    (b"not json", "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"algorithm": "ed25519", "key_id": 5, "signature": "AA=="}', "field 'key_id'"),
])
def test_signature_that_is_not_an_object_is_one_clear_error(tmp_path, raw, match):
    art = craft(tmp_path / "s.edgepkg", full(), MODEL, extra=(("manifest.sig", raw),))
    with pytest.raises(ArtifactError, match=match):
        verify_archive(art)


def test_old_artifacts_without_optional_sections_load(tmp_path):
    """Fields added later (runtime, selftest, device, evidence) are optional; unknown keys are kept as info."""
    m = base_manifest()
    art = write_artifact(tmp_path / "old.edgepkg", m, MODEL)
    model = edgeml.load(art, cache_dir=tmp_path / "c")
    assert model.spec.runtime is None and model.spec.selftest is None and model.spec.device is None
    assert model.spec.inputs[0].shape == (None, 4) and model.manifest["name"] == "tiny"
    assert model.predict({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)
    model.close()


def test_typed_spec_round_trips_and_keeps_evidence_as_info():
    m = full(device="cpu", runtime={"threads": 2}, candidates=[{"label": "a"}], provenance={"created": "x"},
             selftest={"file": "model/model.onnx", "rtol": 0.001, "atol": 0.0001, "samples": 4,
                       "reference": "compiled", "latency_budget_ms": None})
    spec = Manifest.from_dict(m)
    assert spec.to_dict() == m
    assert Manifest.from_dict(spec.to_dict()) == spec
    assert spec.info["candidates"] == [{"label": "a"}] and spec.runtime is not None and spec.runtime.threads == 2
    with pytest.raises(AttributeError):
        spec.name = "other"  # frozen


def test_write_artifact_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(ArtifactError, match="field 'inputs\\[0\\].shape'"):
        write_artifact(tmp_path / "w.edgepkg", base_manifest(inputs=[{"name": "x", "dtype": "float32",
                                                                      "shape": "abc"}]), MODEL)
    assert not (tmp_path / "w.edgepkg").exists()


def test_inspect_reads_the_manifest_through_the_schema(tmp_path):
    art = craft(tmp_path / "i.edgepkg", full(required_features="sse4_2"), MODEL)
    with pytest.raises(ArtifactError, match="field 'required_features'"):
        read_manifest(art)


def test_one_dtype_map_refuses_unknown_names():
    assert dtype_of("FP32") == "float32" and datatype_of(np.dtype("int64")) == "INT64"
    assert datatype_of("float16") == "FP16" and numpy_dtype("uint8") == np.dtype("uint8")
    assert all(datatype_of(v) == k for k, v in DATATYPE_TO_DTYPE.items())
    for bad in ("FP8", "float32", None):
        with pytest.raises(DataError, match="unknown datatype"):
            dtype_of(bad)
    with pytest.raises(DataError, match="has no v2 datatype"):
        datatype_of(np.dtype("complex64"))     # never a silent FP32
    with pytest.raises(DataError, match="unknown dtype"):
        numpy_dtype("object")


def test_summarize_names_caps_what_an_error_lists():
    text = summarize_names((f"model/{i}" for i in range(200_000)))
    assert text.endswith("and 199990 more") and text.count("'model/") == 10 and len(text) < 400
    assert summarize_names(["a", "b"]) == "'a', 'b'"


def test_zip_without_manifest_is_refused(tmp_path):
    art = tmp_path / "nom.edgepkg"
    with zipfile.ZipFile(art, "w") as zf:
        zf.writestr("model/model.onnx", b"x")
    with pytest.raises(ArtifactError, match="no member 'manifest.json'"):
        verify_archive(art)
