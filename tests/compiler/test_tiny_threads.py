"""Tiny models: one thread without spinning is a measured setting of the fastest candidate, never assumed."""

from __future__ import annotations

import numpy as np

import edgeml
from edgeml.compiler import compile_with_report


def test_a_tiny_model_times_one_thread_beside_the_default_and_keeps_the_faster(mlp_file, mlp_data, tmp_path,
                                                                              host_target):
    result = compile_with_report(mlp_file, target=host_target.name, output=tmp_path / "m.edgepkg",
                                 backend="onnxruntime", precision="fp32", eval=mlp_data["eval"], cache_dir=False,
                                 benchmark_seconds=0.3)
    base = {c["label"]: c for c in result.candidates}["onnxruntime/fp32"]
    assert base["status"] == "selected" and len(result.candidates) == 1   # a setting, not another candidate
    choice = base["thread_choice"]
    assert choice is not None, "the MLP is expected to run under 0.2 ms; this test proves nothing otherwise"
    m = result.manifest
    if choice["one_thread_p50"] < choice["default_p50"]:   # whichever was measured faster; the manifest follows
        assert base["threads"] == 1 and m["runtime"]["threads"] == 1
        assert m["backend"]["options"]["allow_spinning"] is False
    else:
        assert base["threads"] is None and "allow_spinning" not in m["backend"]["options"]
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    x = np.asarray(np.load(mlp_data["eval"])["x"][:4])
    assert model.predict({"x": x})[m["outputs"][0]["name"]].shape[0] == 4
    assert model.selftest().passed
