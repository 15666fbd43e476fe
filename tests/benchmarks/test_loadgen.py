"""Scenarios: known answers under a fake clock, then short real runs on a tiny ONNX model."""

from __future__ import annotations

import numpy as np
import pytest

from edgeml.benchmarks.loadgen import BenchSettings, Clock, run_benchmark
from edgeml.errors import UsageError

MS = 1e-3


def _fake_settings(**kw):
    base = dict(duration_s=0.0, min_queries=100, repeats=2, warmup_s=0.0, warmup_queries=10, sweep=False)
    base.update(kw)
    return BenchSettings(**base)


def test_single_stream_known_percentiles_with_fake_clock(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [k * MS for k in range(1, 11)], batch_axis=None)
    clock = Clock(now=fake_clock.now, sleep=fake_clock.sleep)
    r = run_benchmark(target, _fake_settings(), clock=clock, system={})
    assert r["verdict"] == {"result": "VALID", "reasons": []}
    assert r["warmup"]["queries"] == 10 and r["warmup"]["first_ms"] == pytest.approx(1.0)
    for rep in r["repeats"]:
        assert rep["queries"] == 100
        assert rep["duration_s"] == pytest.approx(0.55)
        assert rep["queries_per_s"] == pytest.approx(100 / 0.55)
        lat = rep["latency_ms"]
        assert (lat["p50"], lat["p90"], lat["p99"], lat["min"], lat["max"]) == pytest.approx((5, 9, 10, 1, 10))
    assert r["metrics"]["latency_ms"]["count"] == 200
    assert r["metrics"]["headline"]["metric"] == "p90_ms" and r["metrics"]["headline"]["value"] == pytest.approx(9.0)
    assert r["spread"]["p50_ms"]["rel_range"] == pytest.approx(0.0, abs=1e-6)
    assert len(r["trace"]["t_s"]) == 200 and r["trace"]["t_s"][0] == pytest.approx(0.055)  # after the warm-up
    assert target.batches == [1] * 210


def test_single_stream_cut_short_is_invalid_with_reasons(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [2 * MS])
    clock = Clock(now=fake_clock.now, sleep=fake_clock.sleep)
    r = run_benchmark(target, _fake_settings(duration_s=1.0, min_queries=1000, max_duration_s=0.2, repeats=1),
                      clock=clock, system={})
    assert r["verdict"]["result"] == "INVALID"
    reasons = r["verdict"]["reasons"]
    assert any("under the minimum duration 1 s" in x for x in reasons)
    assert any("queries, under the minimum 1000" in x for x in reasons)
    assert r["repeats"][0]["queries"] == 100  # 0.2 s / 2 ms


def test_min_duration_keeps_running_past_min_queries(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [2 * MS])
    r = run_benchmark(target, _fake_settings(duration_s=1.0, min_queries=10, repeats=1),
                      clock=Clock(fake_clock.now, fake_clock.sleep), system={})
    assert r["verdict"]["result"] == "VALID"
    assert r["repeats"][0]["queries"] == 500


def test_multi_stream_static_batch_sums_sample_latencies(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [2 * MS], batch_axis=1)
    r = run_benchmark(target, _fake_settings(scenario="multi-stream", samples_per_query=4, min_queries=50, repeats=1),
                      clock=Clock(fake_clock.now, fake_clock.sleep), system={})
    rep = r["repeats"][0]
    assert rep["queries"] == 50 and rep["samples"] == 200 and rep["samples_per_query"] == 4
    assert rep["latency_ms"]["p99"] == pytest.approx(8.0)
    assert r["metrics"]["headline"]["metric"] == "p99_ms"


def test_multi_stream_dynamic_batch_sends_one_batch_per_query(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [3 * MS], batch_axis=None)
    r = run_benchmark(target, _fake_settings(scenario="multi-stream", samples_per_query=8, min_queries=20, repeats=1),
                      clock=Clock(fake_clock.now, fake_clock.sleep), system={})
    assert r["repeats"][0]["latency_ms"]["p99"] == pytest.approx(3.0)
    assert r["repeats"][0]["samples"] == 160
    assert target.batches[-20:] == [8] * 20


def test_offline_throughput_is_batch_over_latency(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [4 * MS], batch_axis=None)
    r = run_benchmark(target, _fake_settings(scenario="offline", batch=8, min_queries=0, duration_s=0.4, repeats=1),
                      clock=Clock(fake_clock.now, fake_clock.sleep), system={})
    assert r["metrics"]["samples_per_s"] == pytest.approx(2000.0)
    assert r["metrics"]["headline"]["metric"] == "samples_per_s"
    assert r["metrics"]["batch"] == 8


def test_fixed_batch_axis_rejects_other_batch(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [MS], batch_axis=1)
    with pytest.raises(UsageError, match="fixed at 1"):
        run_benchmark(target, _fake_settings(batch=4), clock=Clock(fake_clock.now, fake_clock.sleep), system={})


def _lindley(arrivals, service_s):
    """FIFO single-server queue: latency = finish - arrival, finish = max(arrival, previous finish) + service."""
    finish, out = -1e9, []
    for a in arrivals:
        finish = max(a, finish) + service_s
        out.append((finish - a) * 1e3)
    return np.asarray(out)


def test_server_single_worker_matches_the_queueing_recursion(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [2 * MS])
    s = _fake_settings(scenario="server", target_qps=400.0, latency_bound_ms=50.0, duration_s=20.0, min_queries=10,
                       repeats=1, max_trace_points=100_000)
    r = run_benchmark(target, s, clock=Clock(fake_clock.now, fake_clock.sleep, spin_s=0.0), system={})
    rep = r["repeats"][0]
    arrivals = np.asarray(r["trace"]["t_s"]) - r["warmup"]["duration_s"]
    assert r["trace"]["stride"] == 1 and len(arrivals) == rep["queries"]
    assert rep["offered_qps"] == pytest.approx(400, rel=0.05)  # ~8000 Poisson arrivals
    want = _lindley(arrivals, 2 * MS)
    assert np.asarray(r["trace"]["latency_ms"]) == pytest.approx(want, abs=2e-3)  # query by query
    assert rep["latency_ms"]["p50"] == pytest.approx(np.percentile(want, 50, method="inverted_cdf"), abs=2e-3)
    assert rep["latency_ms"]["p99"] == pytest.approx(np.percentile(want, 99, method="inverted_cdf"), abs=2e-3)
    assert rep["latency_ms"]["min"] == pytest.approx(2.0, abs=1e-3)  # an empty queue: just the service time
    # M/D/1 at utilisation 0.8: mean wait = rho / (2 mu (1 - rho)) = 4 ms, so mean latency is about 6 ms
    assert rep["latency_ms"]["mean"] == pytest.approx(6.0, rel=0.25)
    assert r["verdict"]["result"] == "VALID"


def test_server_overload_is_invalid(fake_clock, make_fake_target):
    target = make_fake_target(fake_clock, [2 * MS])
    s = _fake_settings(scenario="server", target_qps=1000.0, latency_bound_ms=20.0, duration_s=2.0, min_queries=10, repeats=1)
    r = run_benchmark(target, s, clock=Clock(fake_clock.now, fake_clock.sleep, spin_s=0.0), system={})
    reasons = " ".join(r["verdict"]["reasons"])
    assert r["verdict"]["result"] == "INVALID"
    assert "p99 latency" in reasons and "under 90% of the target" in reasons
    assert r["repeats"][0]["completed_qps"] == pytest.approx(500, rel=0.05)  # the service rate caps it


def test_server_needs_a_rate():
    with pytest.raises(UsageError, match="target-qps"):
        BenchSettings(scenario="server").check()
    assert BenchSettings(scenario="server", target_qps=5).check().latency_bound_ms == 100.0
    with pytest.raises(UsageError, match="unknown scenario"):
        BenchSettings(scenario="batchy").check()


# ----------------------------------------------------------------------------- real runs

def _short(**kw):
    base = dict(duration_s=0.2, min_queries=20, repeats=2, warmup_s=0.05, warmup_queries=5,
                sweep_levels=(1, 2), sweep_duration_s=0.1)
    base.update(kw)
    return BenchSettings(**base)


def _check_report(result, directory):
    from edgeml.benchmarks.report import load_result, write_report

    files = write_report(result, directory)
    loaded = load_result(files["json"])
    assert loaded["scenario"] == result["scenario"]
    md = (directory / "report.md").read_text()
    assert f"— {result['scenario']}" in md and result["verdict"]["result"] in md
    page = (directory / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # CDF, timeline, concurrency (all embedded)
    assert "src=\"http" not in page and ".png\"" not in page
    assert (directory / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scenario,extra", [
    ("single-stream", {}),
    ("multi-stream", {"samples_per_query": 4}),
    ("offline", {"batch": 8, "concurrency": 2}),
    ("server", {"target_qps": 200.0, "latency_bound_ms": 50.0}),
])
def test_each_scenario_runs_for_real_and_writes_three_reports(tiny_onnx, tmp_path, scenario, extra):
    r = run_benchmark(tiny_onnx, _short(scenario=scenario, **extra))
    assert r["schema"] == "edgeml.bench.result" and r["scenario"] == scenario
    assert r["model"]["kind"] == "onnx" and len(r["model"]["sha256"]) == 64
    assert r["metrics"]["latency_ms"]["count"] == sum(p["queries"] for p in r["repeats"])
    assert all(p["duration_s"] >= 0.2 and p["queries"] >= 20 for p in r["repeats"])
    assert r["cold_start"]["cold_start_ms"] > 0 and r["memory"]["peak_rss_mb"] > 0
    assert [row["concurrency"] for row in r["concurrency_sweep"]] == [1, 2]
    assert r["system"]["cpu"]["logical_cores"] >= 1 and r["system"]["packages"]["onnxruntime"]
    if scenario == "server":
        assert r["metrics"]["server"]["target_qps"] == 200.0
        # Poisson at 200 QPS on a microsecond model: the offered rate is met
        assert r["metrics"]["server"]["completed_qps"]["median"] == pytest.approx(200, rel=0.5)
    _check_report(r, tmp_path / scenario)


def test_server_peak_search_brackets_the_queueing_limit(fake_clock, make_fake_target):
    """2 ms per query, one worker: capacity 500 QPS; p99 <= 20 ms holds well below it and breaks above it."""
    target = make_fake_target(fake_clock, [2 * MS])
    s = _fake_settings(scenario="server", find_peak=True, latency_bound_ms=20.0, probe_duration_s=4.0, search_steps=6,
                       duration_s=4.0, min_queries=10, repeats=1)
    r = run_benchmark(target, s, clock=Clock(fake_clock.now, fake_clock.sleep, spin_s=0.0), system={})
    search = r["qps_search"]
    assert search["capacity_estimate_qps"] == pytest.approx(500.0)
    assert 250.0 < search["peak_qps"] < 500.0
    for p in search["probes"]:
        assert p["valid"] == (p["p99_ms"] <= 20.0 and not p["reasons"])
        if p["qps"] >= 500.0:
            assert not p["valid"]  # over capacity the queue only grows
    held = [p["qps"] for p in search["probes"] if p["valid"]]
    assert max(held) == search["peak_qps"]
    assert r["metrics"]["server"]["target_qps"] == search["peak_qps"]  # the repeats ran at the peak


def test_server_peak_search_real_run_reports_probes(tiny_onnx, tmp_path):
    s = _short(scenario="server", find_peak=True, latency_bound_ms=50.0, search_steps=3, probe_duration_s=0.15,
               repeats=1, sweep=False, target_qps=100.0)
    r = run_benchmark(tiny_onnx, s)
    search = r["qps_search"]
    assert len(search["probes"]) >= 2
    for p in search["probes"]:
        assert p["valid"] == (not p["reasons"]) and (p["p99_ms"] <= 50.0 or not p["valid"])
    if search["peak_qps"] is not None:
        assert search["peak_qps"] == max(p["qps"] for p in search["probes"] if p["valid"])
    assert r["metrics"]["server"]["target_qps"] == 100.0  # an explicit --target-qps wins over the peak
    from edgeml.benchmarks.report import write_report

    write_report(r, tmp_path)
    assert "Peak QPS search" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "qps_search.png").exists()


def test_edgepkg_single_stream(tiny_edgepkg, tmp_path):
    from edgeml.runtime.signing import file_sha256

    r = run_benchmark(tiny_edgepkg, _short(batch=4, sweep=False), cache_dir=tmp_path / "cache")
    m = r["model"]
    assert m["kind"] == "edgepkg" and m["sha256"] == file_sha256(tiny_edgepkg)
    assert (m["precision"], m["backend"], m["target"], m["name"]) == ("fp32", "onnxruntime", "x86_64", "tiny")
    assert r["metrics"]["batch"] == 4 and r["repeats"][0]["samples"] == 4 * r["repeats"][0]["queries"]


@pytest.mark.slow
def test_openvino_edgepkg_gets_one_model_per_worker(tiny_onnx, tmp_path):
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    from edgeml.benchmarks.sut import open_target
    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import get_target

    ov.save_model(ov.convert_model(str(tiny_onnx)), str(tmp_path / "model.xml"))
    t = get_target("x86_64")
    manifest = {"name": "tiny-ov", "version": "1", "target": t.name, "required_features": list(t.required_features),
                "arch": t.arch, "precision": "fp32",
                "backend": {"name": "openvino", "version": ov.get_version(), "entrypoint": "model/model.xml", "options": {}},
                "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 16]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 8]}]}
    pkg = write_artifact(tmp_path / "tiny-ov.edgepkg", manifest,
                         {"model/model.xml": tmp_path / "model.xml", "model/model.bin": tmp_path / "model.bin"})
    target = open_target(pkg, cache_dir=tmp_path / "cache")
    r = run_benchmark(target, _short(scenario="offline", concurrency=2, repeats=1))
    assert len(target.models) == 2  # OpenVINO infer requests are not shared between threads
    assert r["model"]["backend"] == "openvino" and r["verdict"]["result"] == "VALID"
    target.close()
