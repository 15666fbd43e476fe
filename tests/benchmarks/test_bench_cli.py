"""``edgeml bench`` and ``edgeml bench compare`` through the real click entry point."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from edgeml.cli import main

FAST = ["--duration", "100ms", "--min-queries", "10", "--repeats", "2", "--warmup", "50ms", "--no-sweep"]


def _invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)], catch_exceptions=False)


def test_bench_json_prints_the_result(tiny_onnx):
    res = _invoke(tiny_onnx, *FAST, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["schema"] == "edgeml.bench.result" and result["scenario"] == "single-stream"
    assert result["settings"]["duration_s"] == 0.1 and len(result["repeats"]) == 2
    assert result["verdict"]["result"] == "VALID"


def test_bench_run_alias_and_human_output_and_report(tiny_onnx, tmp_path):
    res = _invoke("run", tiny_onnx, "--scenario", "offline", "--batch", "4", *FAST, "--report", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert "offline: VALID" in res.stdout and "samples/s" in res.stdout
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"result.json", "report.md", "report.html", "latency_cdf.png"}


def test_compare_two_results(tiny_onnx, tmp_path):
    for name, threads in (("a", "1"), ("b", "2")):
        res = _invoke(tiny_onnx, *FAST, "--threads", threads, "--report", tmp_path / name)
        assert res.exit_code == 0, res.output
    res = _invoke("compare", tmp_path / "a/result.json", tmp_path / "b/result.json", "--label", "t1", "--label", "t2",
                  "--json", "--report", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.stdout)
    assert cmp["schema"] == "edgeml.bench.compare" and cmp["labels"] == ["t1", "t2"]
    row = cmp["comparisons"][0]["metrics"]["p50_ms"]
    assert row["a"]["n"] == 2 and row["b"]["n"] == 2
    assert row["ratio"] == pytest.approx(row["b"]["median"] / row["a"]["median"])
    # the verdict follows the documented rule for these two measured runs (lower latency is better)
    overlap = row["a"]["min"] <= row["b"]["max"] and row["b"]["min"] <= row["a"]["max"]
    expected = "within noise" if overlap else ("better" if row["ratio"] < 1.0 else "worse")
    assert row["verdict"] == expected and row["within_noise"] == overlap
    assert (tmp_path / "cmp/compare.html").read_text().count("data:image/png;base64,") >= 1
    human = _invoke("compare", tmp_path / "a/result.json", tmp_path / "b/result.json")
    assert human.exit_code == 0 and "×" in human.stdout


def test_errors_are_clean_messages_with_exit_codes(tiny_onnx, tmp_path):
    missing = _invoke(tmp_path / "nope.onnx", "--json")
    assert missing.exit_code == 5 and "does not exist" in json.loads(missing.stdout)["message"]
    bad_duration = _invoke(tiny_onnx, "--duration", "ten")
    assert bad_duration.exit_code == 2 and "cannot read duration" in bad_duration.output
    server = _invoke(tiny_onnx, "--scenario", "server")
    assert server.exit_code == 2 and "--target-qps" in server.output
    not_result = tmp_path / "x.json"
    not_result.write_text('{"hello": 1}')
    res = _invoke("compare", not_result, not_result)
    assert res.exit_code == 5 and "field 'schema'" in res.output
    wrong = tmp_path / "m.txt"
    wrong.write_text("x")
    res = _invoke(wrong)
    assert res.exit_code == 2 and "neither an .edgepkg nor an .onnx" in res.output
