"""A random-weight BERT-class encoder (a transformers config in the repo) compiles, serves and keeps cosine.

bert-tiny (2 layers, hidden 64) stands in for bert-mini (MiniLM-L6's shape) so this stays ~20 s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import edgeml
from edgeml.benchmarks import encoder
from edgeml.compiler import compile_with_report

if importlib.util.find_spec("transformers") is None:  # printed in the skip reason
    pytest.skip("transformers is not installed (pip install transformers; the compiler extra should have it)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bert")
    model = encoder.export_onnx("bert-tiny", folder / "bert-tiny.onnx")
    calib, ev = encoder.data("bert-tiny", n_calib=48, n_eval=32)
    np.savez(folder / "calib.npz", **calib)
    np.savez(folder / "eval.npz", **ev)
    return {"model": model, "calib": folder / "calib.npz", "eval": folder / "eval.npz"}


def test_the_export_has_int64_token_inputs_and_a_dynamic_sequence_axis(bert):
    import onnx

    graph = onnx.load(str(bert["model"])).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"


def test_the_encoder_compiles_with_cosine_int8_candidates_and_serves_any_sequence_length(bert, tmp_path, host_target):
    from edgeml.backends.onnxruntime.build import TRANSFORMER_INT8_RECIPES, int8_saturation_hazard

    dynamic_name, static_name = TRANSFORMER_INT8_RECIPES[int8_saturation_hazard(host_target)]
    result = compile_with_report(bert["model"], target=host_target.name, output=tmp_path / "bert.edgepkg",
                                 calib=bert["calib"], eval=bert["eval"], cache_dir=False, benchmark_seconds=0.3,
                                 backend="onnxruntime")
    m = result.manifest
    assert m["accuracy"]["metric"] == "cosine_similarity" and m["accuracy"]["metric_choice"]["source"] == "auto"
    assert [t["shape"] for t in m["inputs"]] == [[None, None], [None, None]]
    cands = {c["label"]: c for c in result.candidates}
    fused = cands["onnxruntime/fp32/transformer-fusion"]
    assert fused["status"] in ("passed", "selected") and fused["recipe"]["fused_operators"]["Attention"] == 2
    dynamic = cands[f"onnxruntime/int8/{dynamic_name}"]
    static = cands[f"onnxruntime/int8/{static_name}"]
    for c in (dynamic, static):   # int8 keeps cosine agreement: within 1 point of 100
        assert c["status"] in ("passed", "selected") and c["accuracy"] >= 99.0, c
    assert dynamic["recipe"]["method"] == "dynamic" and "MatMul" in dynamic["recipe"]["quantized_op_types"]
    assert static["recipe"]["op_types"] == ["MatMul"]
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    for seq in (8, 40):
        out = model.predict(encoder.tokens("bert-tiny", 2, seq))["sentence_embedding"]
        assert out.shape == (2, 64) and np.all(np.isfinite(out))
    assert model.selftest().passed


def test_openvino_quantizes_the_encoder_as_a_transformer(bert, tmp_path, host_target):
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    result = compile_with_report(bert["model"], target=host_target.name, output=tmp_path / "ov.edgepkg",
                                 calib=bert["calib"], eval=bert["eval"], cache_dir=False, benchmark=False,
                                 backend="openvino", ov_accuracy_control=False)
    int8 = {c["label"]: c for c in result.candidates}["openvino/int8/nncf"]
    assert int8["recipe"]["model_type"] == "transformer" and int8["accuracy"] >= 99.0


def test_tvm_refuses_a_dynamic_sequence_cleanly_naming_the_fix(bert, tmp_path, host_target):
    pytest.importorskip("tvm", reason="TVM is not installed")
    from edgeml.errors import CompileError

    with pytest.raises(CompileError) as info:
        compile_with_report(bert["model"], target=host_target.name, output=tmp_path / "t.edgepkg",
                            eval=bert["eval"], cache_dir=False, benchmark=False, backend="tvm", precision="fp32")
    assert "TVM needs static shapes" in info.value.message and "--input-shape input_ids=1,128" in info.value.message
    assert not (tmp_path / "t.edgepkg").exists()


def test_tvm_builds_the_encoder_at_a_fixed_sequence_length_after_folding_shapes(bert, tmp_path, host_target):
    """TVM's importer fails on the export's Gather over shape_of; with static shapes the folded graph imports."""
    pytest.importorskip("tvm", reason="TVM is not installed")
    shapes = {"input_ids": (1, 16), "attention_mask": (1, 16)}
    result = compile_with_report(bert["model"], target=host_target.name, output=tmp_path / "t.edgepkg",
                                 input_shape=shapes, cache_dir=False, benchmark=False, backend="tvm",
                                 precision="fp32")
    tvm = result.selected
    assert tvm is not None and tvm["label"] == "tvm/fp32/untuned" and tvm["accuracy"] >= 99.9
    assert any("folding its shape arithmetic" in note for note in tvm["notes"])
