"""The accuracy metric follows the output's nature (class scores, embeddings, regression), or --metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeml.compiler import compile_with_report
from edgeml.compiler import evaluate as ev
from edgeml.errors import DataError, UsageError


def ds(n: int = 8, labels=None, refs=None) -> ev.Dataset:
    return ev.Dataset({"x": np.zeros((n, 2), np.float32)}, labels, refs or {})


def embeddings(n: int = 64, dim: int = 384, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_an_embedding_output_is_scored_by_cosine_not_by_argmax_agreement():
    """The issue's case: INT8-like noise on a 384-dim embedding flips the argmax of most rows while the
    vectors stay > 0.99 cosine-similar; agreement rejects it, cosine keeps it."""
    fp32 = {"sentence_embedding": embeddings()}
    noise = np.random.default_rng(1).standard_normal(fp32["sentence_embedding"].shape).astype(np.float32)
    int8 = {"sentence_embedding": fp32["sentence_embedding"] + 0.1 * noise}
    choice = ev.explain_metric(ds(64), fp32, ["sentence_embedding"])
    assert choice.name == "cosine_similarity" and choice.source == "auto" and "embed" in choice.reason
    cosine = ev.score("cosine_similarity", int8, fp32, ds(64), ["sentence_embedding"]).value
    agreement = ev.score("fp32_agreement", int8, fp32, ds(64), ["sentence_embedding"]).value
    assert cosine > 99.0 and agreement < 90.0


def test_the_metric_follows_names_shapes_and_values():
    logits = {"logits": embeddings(8, 10)}
    assert ev.choose_metric(ds(), logits, ["logits"]) == "fp32_agreement"
    assert ev.choose_metric(ds(), {"y": embeddings(8, 10)}, ["y"]) == "fp32_agreement"   # unnamed [N, C]
    hidden = {"last_hidden_state": np.ones((8, 32, 16), np.float32)}
    assert ev.choose_metric(ds(), hidden, ["last_hidden_state"]) == "cosine_similarity"
    unit = embeddings(8, 16)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert ev.choose_metric(ds(), {"output_0": unit}, ["output_0"]) == "cosine_similarity"
    softmax = np.exp(unit) / np.exp(unit).sum(axis=1, keepdims=True)
    assert ev.choose_metric(ds(), {"output_0": softmax}, ["output_0"]) == "fp32_agreement"
    assert ev.choose_metric(ds(), {"boxes": np.ones((8, 5, 4), np.float32)}, ["boxes"]) == "relative_error_score"
    assert ev.choose_metric(ds(labels=np.zeros(8, np.int64)), hidden, ["last_hidden_state"]) == "top1"
    refs = {"logits": np.ones((8, 10), np.float32)}
    assert ev.choose_metric(ds(refs=refs), logits, ["logits"]) == "relative_error_score"


def test_cosine_scores_per_token_and_counts_two_zero_vectors_as_agreeing():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[0, 0] = [1, 0, 0, 0]
    out = ref.copy()
    out[0, 0] = [0, 1, 0, 0]                      # one of six token vectors orthogonal, five zero == zero
    assert ev.cosine_score(out, ref) == pytest.approx(100 * 5 / 6)
    assert ev.cosine_score(-ref, ref) == pytest.approx(100 * 5 / 6 - 100 / 6)


def test_a_requested_metric_wins_and_one_that_cannot_be_computed_is_refused():
    fp32 = {"sentence_embedding": embeddings(8, 16)}
    choice = ev.explain_metric(ds(), fp32, ["sentence_embedding"], "relative_error_score")
    assert (choice.name, choice.source) == ("relative_error_score", "user")
    with pytest.raises(DataError, match="--metric top1 needs labels"):
        ev.explain_metric(ds(), fp32, ["sentence_embedding"], "top1")
    with pytest.raises(DataError, match="no class axis"):
        ev.explain_metric(ds(), {"y": np.ones((8,), np.float32)}, ["y"], "fp32_agreement")
    assert ev.metric_name("cosine") == "cosine_similarity"


def _identity(tmp_path: Path, output: str) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], [output])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{output}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _compile(tmp_path: Path, model: Path, **kw):
    data = tmp_path / "eval.npz"
    np.savez(data, x=embeddings(40, 16, seed=4))
    return compile_with_report(model, target="x86_64", output=tmp_path / "out.edgepkg", backend="null", eval=data,
                               cache_dir=False, precision="fp32", benchmark=False,
                               null_candidates={"exact": {}}, **kw)


def test_the_manifest_records_the_metric_and_why(tmp_path):
    auto = _compile(tmp_path, _identity(tmp_path, "embedding")).manifest["accuracy"]
    assert auto["metric"] == "cosine_similarity" and auto["compiled"] == pytest.approx(100.0)
    assert auto["metric_choice"]["source"] == "auto" and "embed" in auto["metric_choice"]["reason"]
    user = _compile(tmp_path, _identity(tmp_path, "embedding"), metric="relative_error").manifest["accuracy"]
    assert user["metric"] == "relative_error_score" and user["metric_choice"]["source"] == "user"
    assert _compile(tmp_path, _identity(tmp_path, "logits")).manifest["accuracy"]["metric"] == "fp32_agreement"


def test_an_unknown_metric_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="unknown metric 'f1'") as info:
        _compile(tmp_path, _identity(tmp_path, "y"), metric="f1")
    assert "cosine_similarity" in (info.value.hint or "")
