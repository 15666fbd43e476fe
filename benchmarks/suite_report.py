"""Render the suite's own output (results/suite.json) into REPORT.md, REPORT.html and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeml.benchmarks import stats
from edgeml.benchmarks.report import _f, _table, html_page, plot_cdf, plot_sweep, system_text
from edgeml.runtime.fsutil import atomic_write_bytes

ASSETS = "report_assets"


def _range(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{_f(s['median'])} ({_f(s['min'])}–{_f(s['max'])})"


def _speedup(base: dict | None, other: dict | None, key: str, higher: bool) -> str:
    if not base or not other:
        return "-"
    a = [r[key] for r in base["repeats"]]
    b = [r[key] for r in other["repeats"]]
    c = stats.compare_metric(a, b, higher_is_better=higher)
    factor = c["ratio"] if higher else 1.0 / c["ratio"]
    return f"{factor:.2f}× ({c['verdict']})"


def model_section(entry: dict[str, Any], pngs: dict[str, bytes]) -> list[str]:
    name = entry["name"]
    lines = [f"### {name}", "", f"ONNX sha256 `{entry['onnx_sha256'][:16]}`", ""]
    base = next((v for v in entry["variants"] if v["label"].startswith("onnx")), None)
    rows = []
    for v in entry["variants"]:
        ss, off = v["runs"].get("single-stream"), v["runs"].get("offline")
        any_run = ss or off
        verdicts = "/".join(r["verdict"]["result"] for r in v["runs"].values())
        rows.append([
            v["label"], str(any_run["model"]["precision"]), _f(v["compile_s"], 1) if v["compile_s"] is not None else "-",
            _range(ss["spread"]["p50_ms"]) if ss else "-", _f(ss["latency_ms"]["p99"]) if ss else "-",
            _speedup(base["runs"].get("single-stream") if base else None, ss, "p50_ms", False) if v is not base else "1.00×",
            _range(off["spread"]["samples_per_s"]) if off else "-",
            _speedup(base["runs"].get("offline") if base else None, off, "samples_per_s", True) if v is not base else "1.00×",
            _f(any_run["cold_start"].get("cold_start_ms"), 1), _f(any_run["memory"].get("peak_rss_mb"), 1), verdicts,
        ])
    batch = next((v["runs"]["offline"]["batch"] for v in entry["variants"] if "offline" in v["runs"]), "-")
    lines += _table(["variant", "precision", "compile s", "single-stream p50 ms (min–max)", "p99 ms", "p50 speed-up vs ONNX",
                     f"offline samples/s, batch {batch} (min–max)", "throughput vs ONNX", "cold start ms",
                     "peak RSS MiB", "verdicts"], rows)
    series = [(v["label"], v["runs"]["single-stream"]["latency_cdf"]) for v in entry["variants"] if "single-stream" in v["runs"]]
    if series:
        pngs[f"{name}_latency_cdf"] = plot_cdf(series)
    sweeps = [(v["label"], v["runs"]["offline"]["concurrency_sweep"]) for v in entry["variants"]
              if "offline" in v["runs"] and v["runs"]["offline"].get("concurrency_sweep")]
    if sweeps:
        pngs[f"{name}_throughput_vs_concurrency"] = plot_sweep(sweeps)
    lines += ["", f"![{name} single-stream latency CDF]({ASSETS}/{name}_latency_cdf.png)"] if series else [""]
    if sweeps:
        lines.append(f"![{name} throughput against concurrency]({ASSETS}/{name}_throughput_vs_concurrency.png)")
    lines.append("")
    return lines


def _tokens(run: dict | None) -> str:
    """Median tokens/s with the min–max over repeats (samples/s of each repeat x the sequence length)."""
    if not run or not run.get("sequence_length"):
        return "-"
    seq = run["sequence_length"]
    per = [r["samples_per_s"] * seq for r in run["repeats"]]
    return f"{_f(float(stats.spread(per)['median']))} ({_f(min(per))}–{_f(max(per))})"


def encoder_section(entry: dict[str, Any]) -> list[str]:
    """One row per variant × sequence length: latency and throughput in tokens/s."""
    name = entry["name"]
    lines = [f"### {name} (transformer encoder)", "", f"ONNX sha256 `{entry['onnx_sha256'][:16]}`; random-weight "
             "BERT-class encoder from benchmarks/encoder.py; inputs `input_ids` (random ids within the vocabulary) "
             "and `attention_mask` (all ones) sized with `--input-shape`. Tokens/s = samples/s × sequence length.", ""]
    rows = []
    for v in entry["variants"]:
        for seq, runs in v["runs"].items():
            ss, off = runs.get("single-stream"), runs.get("offline")
            any_run = ss or off
            rows.append([v["label"], str(any_run["model"]["precision"]), seq,
                         _range(ss["spread"]["p50_ms"]) if ss else "-", _tokens(ss),
                         _range(off["spread"]["samples_per_s"]) if off else "-", _tokens(off),
                         "/".join(r["verdict"]["result"] for r in runs.values())])
    batch = next((r["offline"]["batch"] for v in entry["variants"] for r in v["runs"].values() if "offline" in r), "-")
    lines += _table(["variant", "precision", "sequence length", "single-stream p50 ms (min–max)",
                     "single-stream tokens/s", f"offline samples/s, batch {batch}", "offline tokens/s", "verdicts"], rows)
    lines.append("")
    return lines


def side_by_side_section(items: list[dict[str, Any]]) -> list[str]:
    lines = ["## edgeml bench vs OpenVINO benchmark_app", "",
             "Both tools run the **same OpenVINO IR** (converted once from the reference ONNX, fp32, batch 1) with the "
             "LATENCY performance hint, the same inference thread count, one synchronous infer request, random inputs. "
             "benchmark_app reports OpenVINO's own per-request timer; edgeml bench times the whole `predict` call from "
             "Python. Rounds alternate between the tools; the table shows the median over rounds of each round's "
             "figure (min–max over rounds in brackets). Agreement target: the median-over-rounds ratio of median latency within 10% (the mean and "
             "throughput move with bursts of other load on a shared machine; their agreement is shown, not judged).", ""]
    if not items:
        return lines + ["_Not run in this suite invocation (see skipped runs below)._", ""]
    rows = []
    for it in items:
        for key, label in (("median_ms", "median latency (ms)"), ("average_ms", "mean latency (ms)"), ("throughput_fps", "throughput (inferences/s)")):
            m = it["metrics"][key]
            rows.append([it["model"], label, f"{_f(m['edgeml'])} ({_f(m['edgeml_range'][0])}–{_f(m['edgeml_range'][1])})",
                         f"{_f(m['benchmark_app'])} ({_f(m['benchmark_app_range'][0])}–{_f(m['benchmark_app_range'][1])})",
                         f"{m['ratio']:.3f}", "yes" if m["within_10pct"] else "**no**"])
    lines += _table(["model", "metric", "edgeml bench", "benchmark_app", "ratio edgeml/bapp", "within 10%"], rows)
    for it in items:
        lines += ["", f"{it['model']}: {len(it['rounds'])} rounds, {it.get('threads', '?')} inference thread(s); "
                  f"benchmark_app: `{it['command']}` (config sets INFERENCE_NUM_THREADS); "
                  f"edgeml: `{it.get('edgeml_command', 'edgeml bench model.edgepkg')}` on an .edgepkg wrapping "
                  f"that IR (bin sha256 `{it['ir_sha256'][:16]}`). Verdict: **{'agree' if it['agree'] else 'disagree'}** "
                  "on median latency."]
        lines += ["", "Round by round (median latency ms; the 1-minute load average of this machine when the round ended):", ""]
        lines += _table(["round", "load avg", "edgeml bench", "benchmark_app", "ratio"],
                        [[str(i + 1), _f(r.get("load_average_1min"), 2), r["edgeml"]["median_ms"], r["benchmark_app"]["median_ms"],
                          f"{r['edgeml']['median_ms'] / r['benchmark_app']['median_ms']:.3f}"] for i, r in enumerate(it["rounds"])])
    lines.append("")
    return lines


def render_suite(summary: dict[str, Any], out: Path) -> dict[str, str]:
    out = Path(out)
    pngs: dict[str, bytes] = {}
    sysinfo = summary.get("system", {})
    lines = ["# edgeml benchmark report", "",
             f"Generated by `{summary.get('command', 'python -m edgeml.benchmarks.suite')}` on {summary.get('created')} "
             f"in {summary.get('elapsed_s')} s. This file is rendered from `benchmarks/results/suite.json`; do not edit it "
             "by hand — rerun the suite (or `--render-only`).", "",
             f"Machine: {system_text(sysinfo)}", "",
             "Method: scenarios after MLPerf LoadGen (`edgeml bench`, one fresh process per run). Latency percentiles are "
             "nearest-rank over every measured query; warm-up is excluded; each run is repeated and tables show the median "
             "with the min–max over repeats. A speed-up is called *within noise* when the repeat ranges overlap. "
             "The raw ONNX row runs on ONNX Runtime defaults (before compile); the other rows are artifacts from "
             "`edgeml.compile` for the best host target. Schema of every result: docs/bench-schema.md.", ""]
    lines += side_by_side_section(summary.get("side_by_side") or [])
    lines += ["## Reference models × backends × precisions", ""]
    for entry in summary.get("models", []):
        lines += model_section(entry, pngs)
    if summary.get("encoders"):
        lines += ["## Transformer encoders at sequence lengths " + ", ".join(
            str(n) for n in summary["encoders"][0].get("seq_lens", [])), ""]
        for enc in summary["encoders"]:
            lines += encoder_section(enc)
    skipped = summary.get("skipped") or []
    lines += ["## Skipped or failed", ""]
    if skipped:
        lines += _table(["model", "variant", "stage", "reason"],
                        [[s["model"], s["variant"], s["stage"], s["reason"].replace("|", "/").replace("\n", " ")] for s in skipped])
    else:
        lines.append("Nothing was skipped.")
    lines.append("")
    md = "\n".join(lines)
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        atomic_write_bytes(assets / f"{name}.png", data)
    paths = {"markdown": out / "REPORT.md", "html": out / "REPORT.html"}
    atomic_write_bytes(paths["markdown"], md.encode())
    atomic_write_bytes(paths["html"], html_page("edgeml benchmark report", md, pngs).encode())
    return {k: str(v) for k, v in paths.items()}
