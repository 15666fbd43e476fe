"""The compile pipeline's rules, driven through the null test-double backend (milliseconds per compile).

The real ONNX Runtime computes the FP32 reference of an Identity model; the null
backend's candidates reproduce it exactly or rotate a chosen fraction of samples,
sleep to be slow, or fail to build or to load, as its knobs say.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgeml
from edgeml.compiler import compile_with_report
from edgeml.errors import AccuracyError, CompileError

from null_compile import by_label, compile_null


def test_exact_candidate_is_selected_and_the_artifact_runs_on_the_null_runtime(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"exact": {}})
    m = result.manifest
    assert m["backend"]["name"] == "null" and m["backend"]["entrypoint"] == "model/null.json"
    assert m["accuracy"]["verified"] and m["accuracy"]["drop"] == 0.0 and m["accuracy"]["metric"] == "fp32_agreement"
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(model.predict({"x": x})["y"], x)
    assert model.selftest().passed


def test_candidate_over_the_tolerance_is_rejected_and_the_exact_one_wins(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"lossy": {"error": 0.3}, "exact": {}},
                          max_accuracy_drop=1.0)
    cands = by_label(result)
    lossy = cands["null/fp32/lossy"]
    assert lossy["status"] == "rejected" and 20.0 < lossy["accuracy_drop"] < 40.0
    assert "drops" in lossy["reason"] and "> 1 allowed" in lossy["reason"]
    assert cands["null/fp32/exact"]["status"] == "selected"


def test_a_looser_tolerance_lets_the_lossy_candidate_pass(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"lossy": {"error": 0.3}}, max_accuracy_drop=50.0)
    assert by_label(result)["null/fp32/lossy"]["status"] == "selected"


def test_every_candidate_over_the_tolerance_is_an_accuracy_error(identity_model, eval_data, tmp_path):
    with pytest.raises(AccuracyError, match="no candidate kept accuracy within 1 points") as info:
        compile_null(identity_model, eval_data, tmp_path, {"a": {"error": 0.3}, "b": {"error": 0.6}})
    assert "null/fp32/a: rejected" in info.value.message and "null/fp32/b: rejected" in info.value.message
    assert not (tmp_path / "out.edgepkg").exists()


def test_every_build_failing_is_a_compile_error_naming_each_candidate(identity_model, eval_data, tmp_path):
    with pytest.raises(CompileError, match="no candidate could be built") as info:
        compile_null(identity_model, eval_data, tmp_path, {"a": {"build_fails": True}, "b": {"build_fails": True}})
    assert not isinstance(info.value, AccuracyError)
    assert "null/fp32/a: failed: build failed" in info.value.message and "null/fp32/b" in info.value.message


def test_a_failed_build_does_not_stop_the_others(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"broken": {"build_fails": True}, "ok": {}})
    cands = by_label(result)
    assert cands["null/fp32/broken"]["status"] == "failed" and cands["null/fp32/ok"]["status"] == "selected"


def test_load_failure_on_a_host_target_is_a_failed_runtime_check(identity_model, eval_data, tmp_path):
    with pytest.raises(CompileError, match="runtime check failed: null backend: load failure requested"):
        compile_null(identity_model, eval_data, tmp_path, {"a": {"verify_fails": True}})


def test_unverified_candidates_ship_by_static_order_when_the_host_cannot_run_the_target(
        identity_model, eval_data, tmp_path):
    # aarch64-a72 does not run on this host: a candidate that cannot be loaded here is unverified, not failed.
    result = compile_null(identity_model, eval_data, tmp_path, {"a": {"verify_fails": True}}, target="aarch64-a72")
    m = result.manifest
    assert by_label(result)["null/fp32/a"]["status"] == "selected"
    assert m["accuracy"]["verified"] is False and m["selftest"]["reference"] == "fp32"
    assert m["selection"]["method"] == "static-order-unverified" and m["selection"]["host_runs_target"] is False


def test_nothing_runs_here_for_a_cross_arch_target_even_a_portable_candidate(identity_model, eval_data, tmp_path):
    # Before isolation the null candidate "b" ran on this x86 host and counted as verified for an aarch64
    # target; a run here says nothing about the target's kernels, so both are unverified up front.
    result = compile_null(identity_model, eval_data, tmp_path, {"a": {"verify_fails": True}, "b": {}},
                          target="aarch64-a72")
    cands = by_label(result)
    assert cands["null/fp32/b"]["status"] == "unverified" and cands["null/fp32/a"]["status"] == "selected"
    assert "not run on this host: the target is aarch64" in cands["null/fp32/b"]["reason"]
    assert cands["null/fp32/b"]["verification"]["where"] is None
    assert result.manifest["selection"]["method"] == "static-order-unverified"


def test_the_fastest_passing_candidate_is_selected_when_measured(identity_model, eval_data, tmp_path):
    candidates = {"slow": {"latency_ms": 30}, "fast": {}, "lossy-fastest": {"error": 0.5}}
    result = compile_null(identity_model, eval_data, tmp_path, candidates, benchmark=True, benchmark_seconds=0.05,
                          eval_budget_s=1000.0)
    cands = by_label(result)
    assert cands["null/fp32/fast"]["status"] == "selected"
    assert cands["null/fp32/slow"]["status"] == "passed" and cands["null/fp32/lossy-fastest"]["status"] == "rejected"
    assert result.manifest["selection"]["method"] == "fastest-measured"
    # Without timing the static order decides: the first candidate (the slow one) wins the tie.
    static = compile_null(identity_model, eval_data, tmp_path, candidates)
    assert by_label(static)["null/fp32/slow"]["status"] == "selected"
    assert static.manifest["selection"]["method"] == "static-order"


def test_eval_budget_scores_a_slow_candidate_on_the_samples_it_ran(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"slow": {"latency_ms": 5}}, eval_budget_s=0.001)
    c = by_label(result)["null/fp32/slow"]
    assert c["status"] == "selected" and 1 <= c["eval_samples"] < 200
    assert any("eval budget" in note for note in c["notes"])


def test_precision_filter_applies_to_null_candidates(identity_model, eval_data, tmp_path):
    result = compile_null(identity_model, eval_data, tmp_path, {"half": {"precision": "fp16"}, "full": {}})
    assert list(by_label(result)) == ["null/fp32/full"]


def test_auto_never_picks_the_null_backend(identity_model, eval_data, tmp_path):
    import dataclasses

    from edgeml.targets import get_target

    # Even a target that lists null first: auto tries only the backends whose entry says auto=True.
    target = dataclasses.replace(get_target("x86_64"), backends=("null", "onnxruntime"))
    result = compile_with_report(identity_model, target=target, output=tmp_path / "auto.edgepkg", eval=eval_data,
                                 cache_dir=False, precision="fp32", benchmark=False)
    assert result.manifest["backend"]["name"] != "null"
    assert all(c.get("backend") != "null" for c in result.candidates)


def test_candidates_within_the_margin_are_timed_again_and_the_second_measurement_decides(
        identity_model, eval_data, tmp_path):
    # Two equal candidates (each sleeps 3 ms a run, so microsecond noise cannot split them by 10 %) cannot be told
    # apart by one short run: both are finalists, timed again; the slow one is not.
    result = compile_null(identity_model, eval_data, tmp_path,
                          {"a": {"latency_ms": 3}, "b": {"latency_ms": 3}, "slow": {"latency_ms": 9}},
                          benchmark=True, benchmark_seconds=0.2, eval_budget_s=1000.0)
    cands = by_label(result)
    a, b, slow = (cands[f"null/fp32/{n}"]["latency_ms"] for n in ("a", "b", "slow"))
    assert a["remeasured"] and b["remeasured"] and "first_p50" in a and not slow.get("remeasured")
    assert a["spread_pct"] >= 0 and slow["p50"] > 8.0
    winner = min((a, b), key=lambda t: t["p50"])
    assert cands["null/fp32/a" if winner is a else "null/fp32/b"]["status"] == "selected"
