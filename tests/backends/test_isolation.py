"""Candidates run in worker processes: a crash, a hang or a runaway allocation costs that candidate only.

The misbehaving candidates are the null TEST DOUBLE's (knobs ``crash``, ``hang``, ``allocate_mb``): its
``run`` sends its own process the signal, sleeps forever or touches memory. The compile, the healthy
candidate and this pytest process must come through untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import edgeml
from edgeml.compiler import compile_with_report
from edgeml.compiler.pipeline import execution_plan
from edgeml.targets import get_target

from null_compile import by_label, compile_null

# The null candidates are compiled for the x86_64 target: on another arch nothing may run (never executed here).
pytestmark = pytest.mark.needs_cpu("arch:x86_64")


def worker_children() -> list[int]:
    """Worker processes still alive under this pytest process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), -1)
        if ppid == os.getpid() and b"edgeml.compiler.worker_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_segv_ill_abort_hang_and_a_10_gib_allocation_each_fail_their_candidate_only(
        identity_model, eval_data, tmp_path):
    candidates = {"segv": {"crash": "segv"}, "ill": {"crash": "ill"}, "abort": {"crash": "abort"},
                  "hang": {"hang": True}, "hog": {"allocate_mb": 10240}, "good": {}}
    # Touching memory is slow on some VMs (~200 MB/s seen here): a low limit keeps this test short.
    result = compile_null(identity_model, eval_data, tmp_path, candidates, candidate_timeout_s=10,
                          candidate_memory_mb=320, eval_budget_s=1.0)
    cands = by_label(result)
    assert "segmentation fault (SIGSEGV) while evaluating" in cands["null/fp32/segv"]["reason"]
    assert "illegal instruction (SIGILL)" in cands["null/fp32/ill"]["reason"]
    assert "aborted (SIGABRT)" in cands["null/fp32/abort"]["reason"]
    assert "killed after 11 s while evaluating" in cands["null/fp32/hang"]["reason"]
    assert "exceeded the 320 MiB memory limit while evaluating" in cands["null/fp32/hog"]["reason"]
    for name in ("segv", "ill", "abort", "hang", "hog"):
        assert cands[f"null/fp32/{name}"]["status"] == "failed", name
    good = cands["null/fp32/good"]
    assert good["status"] == "selected" and good["verification"]["complete"] is True
    assert good["verification"]["isolation"] == "worker process" and good["peak_rss_mb"] > 0
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    assert model.selftest().passed
    assert worker_children() == []   # every worker stopped with the compile


def test_a_candidate_that_crashes_while_timed_is_failed_and_the_others_are_timed(
        identity_model, eval_data, tmp_path):
    # Evaluation takes a handful of runs (chunks of up to 64 samples); the benchmark takes many more.
    candidates = {"late": {"crash": "segv", "crash_after": 30}, "fast": {}}
    result = compile_null(identity_model, eval_data, tmp_path, candidates, benchmark=True, benchmark_seconds=0.2,
                          eval_budget_s=1000.0)
    cands = by_label(result)
    assert cands["null/fp32/late"]["status"] == "failed"
    assert "segmentation fault (SIGSEGV) while benchmarking" in cands["null/fp32/late"]["reason"]
    assert cands["null/fp32/fast"]["status"] == "selected" and cands["null/fp32/fast"]["latency_ms"]["p50"] >= 0
    assert result.manifest["selection"]["method"] == "fastest-measured"


def test_in_process_isolation_gives_the_same_choice_and_outputs(identity_model, eval_data, tmp_path):
    isolated = compile_null(identity_model, eval_data, tmp_path / "a", {"lossy": {"error": 0.3}, "exact": {}})
    inline = compile_null(identity_model, eval_data, tmp_path / "b", {"lossy": {"error": 0.3}, "exact": {}},
                          isolation="none")
    assert [c["status"] for c in isolated.candidates] == [c["status"] for c in inline.candidates]
    assert [c["accuracy"] for c in isolated.candidates] == [c["accuracy"] for c in inline.candidates]
    assert inline.selected["verification"]["isolation"] == "in process"


def test_masked_host_runs_portable_candidates_as_an_indication_only(
        identity_model, eval_data, tmp_path, mask_host_features):
    mask_host_features("-avx512*,-amx*,-avx_vnni")
    result = compile_null(identity_model, eval_data, tmp_path, {"lossy": {"error": 0.3}, "exact": {}},
                          target="x86_64-avx512-vnni")
    cands = by_label(result)
    exact, lossy = cands["null/fp32/exact"], cands["null/fp32/lossy"]
    assert exact["status"] == "selected" and lossy["status"] == "unverified"
    assert "measured on this host with its own" in lossy["reason"] and "indicative only" in lossy["reason"]
    assert "over the 1 allowed" in lossy["reason"] and "avx512f" in lossy["reason"]
    record = exact["verification"]
    assert record["complete"] is False and record["kernels"] == "this host's"
    assert {"avx512f", "avx512bw", "avx512_vnni"} <= set(record["target_features_missing_here"])
    m = result.manifest
    assert m["accuracy"]["verified"] is False and m["selftest"]["reference"] == "fp32"
    assert m["selection"]["method"] == "static-order-unverified"


def test_native_code_for_missing_features_is_never_executed(mask_host_features):
    mask_host_features("-avx512*,-amx*,-avx_vnni")
    target = get_target("x86_64-avx512-vnni")
    assert execution_plan(target, "tvm")[0] == "none"
    assert execution_plan(target, "onnxruntime")[0] == "host-kernels"
    assert execution_plan(get_target("aarch64-a72"), "onnxruntime")[0] == "none"
    assert execution_plan(get_target("x86_64"), "tvm") == ("full", [])


def test_the_mask_only_hides_features_and_gives_workers_the_onednn_cap(mask_host_features):
    from edgeml.targets import host_features, isolation_env, masked_features, real_host_features

    real = real_host_features()
    mask_host_features("-avx512*,-made_up_feature")
    assert not any(f.startswith("avx512") for f in host_features())
    assert host_features() <= real and "made_up_feature" not in host_features()
    assert masked_features() == sorted(f for f in real if f.startswith("avx512"))
    env = isolation_env()
    assert env["EDGEML_HOST_FEATURES"] == "-avx512*,-made_up_feature"
    if "avx2" in real:
        assert env["ONEDNN_MAX_CPU_ISA"] in ("AVX2", "AVX2_VNNI")
    mask_host_features("sse4_2,avx2,not_a_flag")   # a keep-list: never adds what the CPU lacks
    assert host_features() <= {"sse4_2", "avx2", "x86_64", "cuda", "intel_gpu"} and "not_a_flag" not in host_features()


@pytest.mark.parametrize("value, message", [
    ({"isolation": "thread"}, "isolation 'thread' is not process or none"),
    ({"candidate_timeout_s": 0}, "candidate_timeout_s must be between 1 and 86400"),
    ({"candidate_memory_mb": 1}, "candidate_memory_mb must be between 64"),
    ({"null_candidates": {"x": {"crash": "boom"}}}, "crash must be one of segv, ill, abort, bus"),
])
def test_isolation_options_are_checked_before_any_work(identity_model, eval_data, tmp_path, value, message):
    from edgeml.errors import UsageError

    kw = {"null_candidates": {"exact": {}}, **value}
    with pytest.raises(UsageError, match=message):
        compile_with_report(identity_model, target="x86_64", output=tmp_path / "o.edgepkg", backend="null",
                            eval=eval_data, cache_dir=False, precision="fp32", **kw)
    assert not (tmp_path / "o.edgepkg").exists()


def test_worker_outputs_are_the_runtimes_outputs(identity_model, tmp_path):
    from edgeml.compiler.worker import WorkerPool

    folder = tmp_path / "cand" / "model"
    folder.mkdir(parents=True)
    (folder / "null.json").write_text("{}")
    manifest = {"backend": {"name": "null", "entrypoint": "model/null.json"},
                "outputs": [{"name": "y", "shape": [None, 4], "dtype": "float32"}]}
    pool = WorkerPool(tmp_path / "w")
    try:
        handle = pool.open("null", tmp_path / "cand", manifest, None)
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(handle.run({"x": x})["y"], x)
        handle.close()
        again = pool.open("null", tmp_path / "cand", manifest, None)   # the clean worker is reused
        assert len(pool._all) == 1
        again.close()
    finally:
        pool.close()
    assert worker_children() == []
