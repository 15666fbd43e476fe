"""The suite: benchmark_app log parsing, rendering REPORT.md from suite output, one tiny end-to-end run."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeml.benchmarks import suite

BAPP_LOG = """[Step 11/11] Dumping statistics report
[ INFO ] Count:            191689 iterations
[ INFO ] Duration:         2000.01 ms
[ INFO ] Latency:
[ INFO ]    Median:        6.66 us
[ INFO ]    Average:       7.23 us
[ INFO ]    Min:           6.43 us
[ INFO ]    Max:           4.86 ms
[ INFO ] Throughput:   95844.06 FPS
"""


def test_parse_benchmark_app_log_converts_units():
    got = suite.parse_benchmark_app(BAPP_LOG)
    assert got["median_ms"] == pytest.approx(0.00666) and got["average_ms"] == pytest.approx(0.00723)
    assert got["max_ms"] == pytest.approx(4.86) and got["throughput_fps"] == pytest.approx(95844.06)
    assert got["iterations"] == 191689
    with pytest.raises(RuntimeError, match="could not read"):
        suite.parse_benchmark_app("[ ERROR ] nothing here")


@pytest.mark.slow
def test_tiny_suite_end_to_end_renders_report_from_its_own_output(tiny_onnx, tmp_path):
    argv = ["--models", "", "--onnx", f"tiny={tiny_onnx}", "--backends", "", "--encoders", "", "--duration", "200ms", "--repeats", "2",
            "--bapp-models", "tiny" if shutil.which("benchmark_app") or (suite.Path(suite.sys.executable).parent / "benchmark_app").exists() else "",
            "--bapp-rounds", "1", "--bapp-seconds", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert suite.main(argv) == 0
    summary = json.loads((tmp_path / "out/results/suite.json").read_text())
    assert summary["schema"] == "edgeml.bench.suite"
    tiny = summary["models"][0]
    assert tiny["name"] == "tiny" and tiny["variants"][0]["label"] == "onnx (ORT defaults)"
    runs = tiny["variants"][0]["runs"]
    assert set(runs) == {"single-stream", "offline"} and runs["offline"]["batch"] == 8
    report = (tmp_path / "out/REPORT.md").read_text()
    p50 = runs["single-stream"]["spread"]["p50_ms"]["median"]
    from edgeml.benchmarks.report import _f

    assert _f(p50) in report  # the number in the report is the one the suite measured
    assert "report_assets/tiny_latency_cdf.png" in report and (tmp_path / "out/report_assets/tiny_latency_cdf.png").exists()
    html = (tmp_path / "out/REPORT.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    if summary["side_by_side"]:
        sbs = summary["side_by_side"][0]
        assert sbs["metrics"]["median_ms"]["benchmark_app"] > 0 and "benchmark_app" in report
    # re-rendering from suite.json alone gives the same Markdown
    before = report
    assert suite.main(["--render-only", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/REPORT.md").read_text() == before


@pytest.mark.slow
def test_suite_benchmarks_the_encoder_at_each_sequence_length_in_tokens_per_s(tmp_path):
    pytest.importorskip("transformers", reason="the encoder is built from a transformers BertConfig")
    argv = ["--models", "", "--encoders", "bert-tiny", "--backends", "", "--bapp-models", "", "--duration", "100ms",
            "--repeats", "2", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert suite.main(argv) == 0
    summary = json.loads((tmp_path / "out/results/suite.json").read_text())
    assert summary["skipped"] == [] and summary["config"]["seq_lens"] == [32, 128]
    enc = summary["encoders"][0]
    assert enc["name"] == "bert-tiny" and enc["seq_lens"] == [32, 128]
    runs = enc["variants"][0]["runs"]
    assert set(runs) == {"32", "128"}
    report = (tmp_path / "out/REPORT.md").read_text()
    assert "## Transformer encoders at sequence lengths 32, 128" in report
    from edgeml.benchmarks.report import _f
    from edgeml.benchmarks.stats import spread

    for seq in (32, 128):
        for scen, batch in (("single-stream", 1), ("offline", 8)):
            run = runs[str(seq)][scen]
            assert run["sequence_length"] == seq and run["inputs_used"]["input_ids"]["shape"] == [batch, seq]
            assert run["tokens_per_s"] > 0
            per_repeat = [r["samples_per_s"] * seq for r in run["repeats"]]
            assert _f(float(spread(per_repeat)["median"])) in report  # the report's tokens/s is the measured one
