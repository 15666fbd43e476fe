"""``edgeml compile --backend tvm`` end to end (the pipeline calls TvmCompiler through the backend interface)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits" / "digits.onnx"


def test_edgeml_compile_backend_tvm_for_this_host(tmp_path):
    import onnxruntime as ort

    import edgeml
    from edgeml.targets import best_host_target

    target = best_host_target().name
    out = edgeml.compile(str(DIGITS), target=target, output=tmp_path / "digits-tvm.edgepkg", backend="tvm",
                         precision="fp32", cache_dir=False)
    model = edgeml.load(out, cache_dir=tmp_path / "c")
    assert model.backend_name == "tvm" and model.precision == "fp32"
    assert model.selftest().passed
    name = model.inputs[0].name
    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    got = model.predict({name: x})[model.outputs[0].name]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    chosen = [c for c in model.manifest["candidates"] if c.get("selected")]
    assert chosen and chosen[0]["recipe"]["tuned"] is False
    assert any("untuned" in note for note in chosen[0]["notes"])
