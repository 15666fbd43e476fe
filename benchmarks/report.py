"""Benchmark reports: result JSON (schema in docs/bench-schema.md), Markdown, self-contained HTML.

``write_report(result, DIR)`` writes ``result.json``, ``report.md`` (with PNG
plots beside it) and ``report.html`` (plots embedded as base64 PNG, no external
files). ``compare_results`` builds the comparison of several results, with
ratios against the first and a within-noise call per metric.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

from edgeml.benchmarks import stats
from edgeml.errors import DataError
from edgeml.runtime.fsutil import atomic_write_bytes

COMPARE_SCHEMA = "edgeml.bench.compare"
PLOTS = ("latency_cdf", "latency_over_time", "throughput_vs_concurrency", "qps_search")
# metric key -> (label, higher is better, getter over one repeat dict)
COMPARE_METRICS = {
    "p50_ms": ("p50 latency (ms)", False, lambda p: p["latency_ms"]["p50"]),
    "p90_ms": ("p90 latency (ms)", False, lambda p: p["latency_ms"]["p90"]),
    "p99_ms": ("p99 latency (ms)", False, lambda p: p["latency_ms"]["p99"]),
    "samples_per_s": ("throughput (samples/s)", True, lambda p: p["samples_per_s"]),
}


# ----------------------------------------------------------------------------- JSON

def dumps(obj: Any) -> str:
    """Strict JSON: NaN/inf (e.g. a rate over a zero duration) become null."""
    return json.dumps(clean(obj), indent=2, sort_keys=True, default=_jsonable, allow_nan=False) + "\n"


def clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result JSON written by ``edgeml bench --json/--report`` and check its schema."""
    from edgeml.benchmarks.loadgen import RESULT_SCHEMA, RESULT_SCHEMA_VERSION

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", hint="pass result.json files written by edgeml bench --report") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
        raise DataError(f"{path}: field 'schema' is {data.get('schema') if isinstance(data, dict) else None!r}, "
                        f"expected {RESULT_SCHEMA!r}", hint="pass a result.json written by edgeml bench")
    if data.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {data.get('schema_version')!r}; this edgeml reads {RESULT_SCHEMA_VERSION}")
    for key in ("scenario", "metrics", "repeats", "model"):
        if key not in data:
            raise DataError(f"{path}: result lacks the field '{key}'")
    return data


# ----------------------------------------------------------------------------- plots

def _fig():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_cdf(series: Sequence[tuple[str, dict]]) -> bytes:
    plt, fig, ax = _fig()
    for label, cdf in series:
        if cdf.get("latency_ms"):
            ax.step(cdf["latency_ms"], cdf["fraction"], where="post", label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of queries")
    ax.set_title("Latency CDF")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(plt, fig)


def plot_timeline(result: dict) -> bytes:
    plt, fig, ax = _fig()
    tr = result["trace"]
    ax.plot(tr["t_s"], tr["latency_ms"], ".", markersize=2, alpha=0.5)
    ax.set_xlabel("time since the warm-up began (s)")
    ax.set_ylabel("latency (ms)")
    title = "Latency over time"
    if tr.get("stride", 1) > 1:
        title += f" (every {tr['stride']}th query)"
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return _png(plt, fig)


def plot_sweep(series: Sequence[tuple[str, list]]) -> bytes:
    plt, fig, ax = _fig()
    levels: set[int] = set()
    for label, rows in series:
        if rows:
            ax.plot([r["concurrency"] for r in rows], [r["samples_per_s"] for r in rows], "o-", label=label)
            levels.update(r["concurrency"] for r in rows)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(levels), [str(n) for n in sorted(levels)])
    ax.minorticks_off()
    ax.set_xlabel("concurrent workers")
    ax.set_ylabel("throughput (samples/s)")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_search(search: dict) -> bytes:
    plt, fig, ax = _fig()
    probes = sorted(search["probes"], key=lambda p: p["qps"])
    ok = [p for p in probes if p["valid"]]
    bad = [p for p in probes if not p["valid"]]
    ax.plot([p["qps"] for p in ok], [p["p99_ms"] for p in ok], "o", color="tab:green", label="holds the bound")
    ax.plot([p["qps"] for p in bad], [p["p99_ms"] for p in bad], "x", color="tab:red", label="breaks it")
    ax.axhline(search["latency_bound_ms"], color="gray", linestyle="--", label="latency bound")
    ax.set_xlabel("offered load (queries/s, Poisson)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Server: p99 latency against offered QPS")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def make_plots(result: dict) -> dict[str, bytes]:
    label = _label(result)
    out = {"latency_cdf": plot_cdf([(label, result["latency_cdf"])]), "latency_over_time": plot_timeline(result)}
    if result.get("concurrency_sweep"):
        out["throughput_vs_concurrency"] = plot_sweep([(label, result["concurrency_sweep"])])
    if result.get("qps_search") and result["qps_search"].get("probes"):
        out["qps_search"] = plot_search(result["qps_search"])
    return out


# ----------------------------------------------------------------------------- Markdown

def _label(result: dict) -> str:
    m = result["model"]
    return f"{m.get('name')} [{m.get('backend')}/{m.get('precision')}]"


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}" if abs(x) >= 0.01 else f"{x:.4g}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


def headline_text(result: dict) -> str:
    h = result["metrics"]["headline"]
    s = h["spread"]
    name = h["metric"].replace("_ms", " latency").replace("_per_s", "/s").replace("_", " ")
    return (f"{name}: **{_f(h['value'])} {h['unit']}** (median of {s['n']} repeats; "
            f"min {_f(s['min'])}, max {_f(s['max'])}, range {s['rel_range']:.1%})")


def to_markdown(result: dict, plot_files: dict[str, str] | None = None, *, level: int = 1) -> str:
    h = "#" * level
    m, met, lat = result["model"], result["metrics"], result["metrics"]["latency_ms"]
    v = result["verdict"]
    lines = [f"{h} edgeml bench: {m.get('name')} — {result['scenario']}", ""]
    lines.append(f"**{v['result']}**" + (": " + "; ".join(v["reasons"]) if v["reasons"] else ""))
    lines += ["", headline_text(result), ""]
    lines += _table(["model", "kind", "backend", "precision", "target", "batch", "sha256"],
                    [[str(m.get("path")), m.get("kind"), f"{m.get('backend')} {m.get('backend_version') or ''}",
                      str(m.get("precision")), str(m.get("target")), str(met["batch"]), str(m.get("sha256", ""))[:16]]])
    used = result.get("inputs_used") or {}
    if used:
        lines += ["", "Inputs fed:", ""]
        lines += _table(["input", "shape", "dtype", "source"],
                        [[k, "x".join(map(str, u["shape"])), u["dtype"], u["source"]] for k, u in used.items()])
    if met.get("tokens_per_s"):
        lines += ["", f"Tokens/s (samples/s x sequence length {met['sequence_length']}, padding included): "
                      f"**{_f(met['tokens_per_s'])}**"]
    lines += ["", f"{h}# Latency over all repeats (ms, nearest-rank percentiles)", ""]
    keys = ["min", "mean", "p50", "p90", "p95", "p99", "p99_9", "max"]
    lines += _table(["queries"] + [k.replace("_", ".") for k in keys], [[str(lat["count"])] + [lat[k] for k in keys]])
    lines += ["", f"{h}# Repeats", ""]
    lines += _table(["#", "duration s", "queries", "p50 ms", "p90 ms", "p99 ms", "queries/s", "samples/s", "verdict"],
                    [[str(p["index"] + 1), p["duration_s"], str(p["queries"]), p["latency_ms"]["p50"], p["latency_ms"]["p90"],
                      p["latency_ms"]["p99"], p["queries_per_s"], p["samples_per_s"],
                      p["verdict"] + (" (" + "; ".join(p["reasons"]) + ")" if p["reasons"] else "")]
                     for p in result["repeats"]])
    lines += ["", "Spread over repeats (min / median / max):", ""]
    lines += _table(["metric", "min", "median", "max", "range"],
                    [[k, s["min"], s["median"], s["max"], f"{s['rel_range']:.1%}"] for k, s in result["spread"].items()])
    w, cs, mem = result.get("warmup") or {}, result.get("cold_start") or {}, result.get("memory") or {}
    lines += ["", f"{h}# Start-up and memory", "",
              f"- warm-up (excluded from the statistics): {w.get('queries')} queries in {_f(w.get('duration_s'))} s; "
              f"first {_f(w.get('first_ms'))} ms, p50 {_f(w.get('p50_ms'))} ms",
              f"- cold start (load to first inference): {_f(cs.get('cold_start_ms'))} ms "
              f"(load {_f(cs.get('load_ms'))} ms + first inference {_f(cs.get('first_inference_ms'))} ms)",
              f"- resident memory: {_f(mem.get('rss_before_load_mb'), 1)} MiB before load, "
              f"{_f(mem.get('rss_after_load_mb'), 1)} after load, {_f(mem.get('rss_after_run_mb'), 1)} after the run; "
              f"process peak {_f(mem.get('peak_rss_mb'), 1)} MiB"]
    if met.get("server"):
        sv = met["server"]
        lines += ["", f"{h}# Server", "", f"- target {_f(sv['target_qps'])} QPS (Poisson), p99 bound {_f(sv['latency_bound_ms'])} ms; "
                  f"completed {_f(sv['completed_qps']['median'])} QPS (min {_f(sv['completed_qps']['min'])}, max {_f(sv['completed_qps']['max'])})"]
    search = result.get("qps_search")
    if search:
        lines += ["", f"{h}# Peak QPS search", "",
                  f"Highest QPS holding p99 <= {_f(search['latency_bound_ms'])} ms: **{_f(search['peak_qps'])}** "
                  f"({len(search['probes'])} probes of {_f(search['probe_duration_s'])} s)", ""]
        lines += _table(["offered QPS", "completed QPS", "p50 ms", "p99 ms", "holds"],
                        [[p["qps"], p["completed_qps"], p["p50_ms"], p["p99_ms"], "yes" if p["valid"] else "no"]
                         for p in search["probes"]])
    if result.get("concurrency_sweep"):
        lines += ["", f"{h}# Throughput against concurrency", ""]
        lines += _table(["workers", "samples/s", "p50 ms", "p99 ms"],
                        [[str(r["concurrency"]), r["samples_per_s"], r["p50_ms"], r["p99_ms"]] for r in result["concurrency_sweep"]])
    if plot_files:
        lines += [""] + [f"![{name}]({path})" for name, path in plot_files.items()]
    lines += ["", f"{h}# Machine", "", system_text(result["system"]), "",
              f"Settings: `{json.dumps(result['settings'], sort_keys=True)}`", ""]
    return "\n".join(lines)


def system_text(sysinfo: dict) -> str:
    cpu = sysinfo.get("cpu") or {}
    pk = ", ".join(f"{k} {v}" for k, v in sorted((sysinfo.get("packages") or {}).items()) if v)
    return (f"{cpu.get('model')} ({cpu.get('arch')}), {cpu.get('usable_cores')} usable / {cpu.get('logical_cores')} logical cores, "
            f"SIMD: {' '.join(cpu.get('simd') or []) or '-'}; {sysinfo.get('memory_total_mb')} MiB RAM; "
            f"{(sysinfo.get('os') or {}).get('platform')}; Python {sysinfo.get('python')}; load average "
            f"{sysinfo.get('load_average')}; packages: {pk}")


# ----------------------------------------------------------------------------- HTML

def _md_to_html(md: str) -> str:
    """Just enough Markdown (headings, tables, bullets, bold, code) for our own reports."""
    import re

    out: list[str] = []
    table: list[str] = []

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def flush() -> None:
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(-+\|)+", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            out.append(f"<h{n}>{inline(line[n:].strip())}</h{n}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.startswith("!["):
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}code{font-size:85%}")


def html_page(title: str, md: str, pngs: dict[str, bytes]) -> str:
    imgs = "".join(f'<img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   for n, b in pngs.items())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{_md_to_html(md)}\n<h2>Plots</h2>{imgs}\n</body></html>\n")


def to_html(result: dict, pngs: dict[str, bytes] | None = None) -> str:
    pngs = pngs if pngs is not None else make_plots(result)
    return html_page(f"edgeml bench {result['model'].get('name')} {result['scenario']}", to_markdown(result), pngs)


def write_report(result: dict, directory: str | Path) -> dict[str, str]:
    """Write result.json, report.md (+ PNGs) and report.html into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pngs = make_plots(result)
    files = {}
    for name, data in pngs.items():
        atomic_write_bytes(directory / f"{name}.png", data)
        files[name] = f"{name}.png"
    paths = {"json": directory / "result.json", "markdown": directory / "report.md", "html": directory / "report.html"}
    atomic_write_bytes(paths["json"], dumps(result).encode())
    atomic_write_bytes(paths["markdown"], to_markdown(result, files).encode())
    atomic_write_bytes(paths["html"], to_html(result, pngs).encode())
    return {**{k: str(v) for k, v in paths.items()}, **{name: str(directory / f) for name, f in files.items()}}


# ----------------------------------------------------------------------------- compare

def compare_results(results: Sequence[dict], labels: Sequence[str] | None = None,
                    noise_floor: float = stats.DEFAULT_NOISE_FLOOR) -> dict[str, Any]:
    """Ratios of each result against the first (the baseline), per metric, with a within-noise call."""
    if len(results) < 2:
        raise DataError("compare needs at least two results")
    labels = list(labels or [_label(r) for r in results])
    base = results[0]
    warnings = []
    for lab, r in zip(labels[1:], results[1:]):
        if r["scenario"] != base["scenario"]:
            warnings.append(f"{lab} is a {r['scenario']} run; the baseline is {base['scenario']}")
        if r["metrics"].get("batch") != base["metrics"].get("batch"):
            warnings.append(f"{lab} used batch {r['metrics'].get('batch')}; the baseline used {base['metrics'].get('batch')}")
        if (r.get("system", {}).get("cpu") or {}).get("model") != (base.get("system", {}).get("cpu") or {}).get("model"):
            warnings.append(f"{lab} ran on a different CPU than the baseline")
    rows = []
    for lab, r in zip(labels[1:], results[1:]):
        metrics = {}
        for key, (_, higher, get) in COMPARE_METRICS.items():
            metrics[key] = stats.compare_metric([get(p) for p in base["repeats"]], [get(p) for p in r["repeats"]],
                                                higher_is_better=higher, noise_floor=noise_floor)
        rows.append({"label": lab, "model": r["model"], "verdict": r["verdict"]["result"], "metrics": metrics})
    return {"schema": COMPARE_SCHEMA, "schema_version": 1, "baseline": {"label": labels[0], "model": base["model"],
            "verdict": base["verdict"]["result"]}, "labels": labels, "noise_floor": noise_floor,
            "comparisons": rows, "warnings": warnings}


def compare_markdown(cmp: dict, level: int = 1) -> str:
    h = "#" * level
    lines = [f"{h} edgeml bench compare", "", f"Baseline: **{cmp['baseline']['label']}** ({cmp['baseline']['verdict']}). "
             "Ratio = other / baseline on the median over repeats; ranges are min–max over repeats.", ""]
    header = ["result"] + [f"{COMPARE_METRICS[k][0]}" for k in COMPARE_METRICS]
    rows = []
    for row in cmp["comparisons"]:
        cells = [f"{row['label']} ({row['verdict']})"]
        for k in COMPARE_METRICS:
            c = row["metrics"][k]
            cells.append(f"{c['ratio']:.3f}× — {c['verdict']} (base {_f(c['a']['min'])}–{_f(c['a']['max'])}, "
                         f"this {_f(c['b']['min'])}–{_f(c['b']['max'])})")
        rows.append(cells)
    lines += _table(header, rows)
    for w in cmp["warnings"]:
        lines.append(f"- warning: {w}")
    lines.append("")
    return "\n".join(lines)


def write_compare_report(cmp: dict, results: Sequence[dict], directory: str | Path) -> dict[str, str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pngs = {"latency_cdf": plot_cdf([(lab, r["latency_cdf"]) for lab, r in zip(cmp["labels"], results)])}
    sweeps = [(lab, r["concurrency_sweep"]) for lab, r in zip(cmp["labels"], results) if r.get("concurrency_sweep")]
    if sweeps:
        pngs["throughput_vs_concurrency"] = plot_sweep(sweeps)
    files = {}
    for name, data in pngs.items():
        atomic_write_bytes(directory / f"{name}.png", data)
        files[name] = f"{name}.png"
    md = compare_markdown(cmp) + "\n" + "\n".join(f"![{n}]({p})" for n, p in files.items()) + "\n"
    paths = {"json": directory / "compare.json", "markdown": directory / "compare.md", "html": directory / "compare.html"}
    atomic_write_bytes(paths["json"], dumps(cmp).encode())
    atomic_write_bytes(paths["markdown"], md.encode())
    atomic_write_bytes(paths["html"], html_page("edgeml bench compare", compare_markdown(cmp), pngs).encode())
    return {k: str(v) for k, v in paths.items()}
