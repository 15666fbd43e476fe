"""Tiny models: one thread without spinning is a measured candidate of its own, never assumed."""

from __future__ import annotations

import numpy as np

import edgeml
from edgeml.compiler import compile_with_report


def test_a_tiny_model_gets_a_one_thread_variant_timed_beside_the_others(mlp_file, mlp_data, tmp_path, host_target):
    result = compile_with_report(mlp_file, target=host_target.name, output=tmp_path / "m.edgepkg",
                                 backend="onnxruntime", precision="fp32", eval=mlp_data["eval"], cache_dir=False,
                                 benchmark_seconds=0.3)
    cands = {c["label"]: c for c in result.candidates}
    base = cands["onnxruntime/fp32"]
    assert base["latency_ms"]["p50"] < 0.2, "the MLP is expected to be tiny; this test proves nothing otherwise"
    variant = cands["onnxruntime/fp32+1-thread"]
    assert variant["threads"] == 1 and variant["latency_ms"]["p50"] > 0
    assert variant["status"] in ("passed", "selected") and base["status"] in ("passed", "selected")
    chosen = result.selected
    assert chosen is not None
    m = result.manifest
    if chosen["label"] == variant["label"]:   # whichever was measured faster; the manifest follows it
        assert m["runtime"]["threads"] == 1 and m["backend"]["options"]["allow_spinning"] is False
    else:
        assert "allow_spinning" not in m["backend"]["options"]
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    x = np.asarray(np.load(mlp_data["eval"])["x"][:4])
    assert model.predict({"x": x})[m["outputs"][0]["name"]].shape[0] == 4
    assert model.selftest().passed
