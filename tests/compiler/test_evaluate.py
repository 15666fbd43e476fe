"""Accuracy metrics, data checks and budgets on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from edgeml.compiler import evaluate as ev
from edgeml.errors import DataError
from edgeml.runtime.model import TensorSpec


def ds(n=4, labels=None, refs=None):
    return ev.Dataset({"x": np.zeros((n, 2), np.float32)}, labels, refs or {})


def test_top1_agreement_and_relative_error_metrics():
    fp32 = {"y": np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)}
    cand = {"y": np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.float32)}
    labelled = ds(labels=np.array([0, 1, 0, 0]))
    assert ev.choose_metric(labelled, fp32, ["y"]) == "top1"
    assert ev.score("top1", cand, fp32, labelled, ["y"]).value == 50.0
    assert ev.score("top1", fp32, fp32, labelled, ["y"]).value == 75.0
    assert ev.choose_metric(ds(), fp32, ["y"]) == "fp32_agreement"
    assert ev.score("fp32_agreement", cand, fp32, ds(), ["y"]).value == 75.0
    reg = {"z": np.array([[2.0], [4.0]], np.float32)}
    near = {"z": np.array([[2.2], [3.8]], np.float32)}
    assert ev.choose_metric(ds(2), reg, ["z"]) == "relative_error_score"
    s = ev.score("relative_error_score", near, reg, ds(2), ["z"])
    assert s.value == pytest.approx(100 * (1 - 0.4 / 6.0), rel=1e-5)
    assert s.max_abs_error == pytest.approx(0.2, rel=1e-5)
    with_ref = ds(2, refs={"z": np.array([[2.2], [3.8]], np.float32)})
    assert ev.score("relative_error_score", near, reg, with_ref, ["z"]).value == pytest.approx(100.0)


def test_holdout_split_keeps_a_quarter_for_eval():
    calib = ev.Dataset({"x": np.arange(40, dtype=np.float32).reshape(20, 2)}, file="c.npz")
    cal, held = ev.split_holdout(calib)
    assert (cal.n, held.n, held.source) == (15, 5, "calib-holdout")
    assert held.inputs["x"][0, 0] == 30.0


def test_load_dataset_checks_shapes_dtypes_and_labels(tmp_path):
    spec = [TensorSpec("x", "float32", (None, 3))]
    out = [TensorSpec("y", "float32", (None, 2))]
    np.savez(tmp_path / "ok.npz", x=np.ones((5, 3)), labels=np.arange(5), reference_y=np.zeros((5, 2)))
    d = ev.load_dataset(tmp_path / "ok.npz", spec, out, "eval")
    assert d.inputs["x"].dtype == np.float32 and d.n == 5 and "y" in d.references and len(d.sha256) == 64
    np.savez(tmp_path / "ints.npz", x=np.ones((5, 3), np.float32), labels=np.ones(5, np.float32))
    with pytest.raises(DataError, match="labels"):
        ev.load_dataset(tmp_path / "ints.npz", spec, out, "eval")
    np.savez(tmp_path / "ref.npz", x=np.ones((5, 3), np.float32), reference_q=np.ones(5))
    with pytest.raises(DataError, match="reference_q"):
        ev.load_dataset(tmp_path / "ref.npz", spec, out, "eval")
    np.savez(tmp_path / "str.npz", x=np.array([["a", "b", "c"]]))
    with pytest.raises(DataError, match="dtype"):
        ev.load_dataset(tmp_path / "str.npz", spec, out, "eval")


def test_run_batched_chunks_fixed_batches_and_respects_a_budget():
    x = {"x": np.arange(10, dtype=np.float32)[:, None]}
    calls = []

    def run(feeds):
        calls.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    out = ev.run_batched(run, x, batch=3)
    assert calls == [3, 3, 3] and out["y"].shape == (9, 1)
    now = [0.0]

    def slow(feeds):
        now[0] += 1.0 * len(feeds["x"])      # 1 s per sample
        return {"y": feeds["x"]}

    out = ev.run_batched(slow, x, batch=None, budget_s=3.5, clock=lambda: now[0])
    assert 4 <= len(out["y"]) < 10


def test_drift_profile_has_stats_and_histograms():
    prof = ev.drift_profile({"y": np.array([[0.0, 1.0], [2.0, 3.0]])}, {"x": np.ones((2, 2))}, bins=4)
    y = prof["outputs"]["y"]
    assert (y["mean"], y["min"], y["max"], sum(y["histogram"]["counts"])) == (1.5, 0.0, 3.0, 4)
    assert len(y["histogram"]["edges"]) == 5 and prof["samples"] == 2 and "x" in prof["inputs"]
