"""``edgeml bench``: LoadGen-style benchmarks of an artifact or a raw ONNX model.

    edgeml bench MODEL [--scenario ...] [--duration 60s] ...   (same as: edgeml bench run MODEL ...)
    edgeml bench compare A.json B.json [...] [--report DIR]
"""

from __future__ import annotations

from pathlib import Path

import click

from edgeml.cli import DurationType, check_trusted_keys, emit, examples, handle_errors, json_option


class BenchGroup(click.Group):
    """A group whose default command is ``run``: ``edgeml bench MODEL`` == ``edgeml bench run MODEL``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("bench", cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
def bench_group() -> None:
    """Benchmark MODEL (.edgepkg or .onnx) with MLPerf-LoadGen-style scenarios.

    \b
    edgeml bench MODEL [--scenario single-stream|multi-stream|offline|server] [--duration 60s] ...
    edgeml bench compare A.json B.json [...] [--report DIR]

    `edgeml bench MODEL ...` is short for `edgeml bench run MODEL ...` (see its --help).
    """


def _duration(ctx, param, value):
    if value is None:
        return None
    from edgeml.benchmarks.stats import parse_duration
    from edgeml.errors import UsageError

    try:
        return parse_duration(value)
    except UsageError as exc:
        raise click.BadParameter(exc.message) from None


@bench_group.command("run", epilog=examples(
    "edgeml bench digits.edgepkg                       # single-stream, 3 repeats of 10 s",
    "edgeml bench digits.edgepkg --scenario server --duration 20s --report out/   # + HTML, plots",
    "edgeml bench examples/digits/digits.onnx --scenario offline --batch 32"))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--scenario", type=click.Choice(["single-stream", "multi-stream", "offline", "server", "generate"]),
              default="single-stream", show_default=True,
              help="MLPerf scenario: one query at a time (latency), N streams, all at once (throughput), or"
                   " Poisson arrivals at a target rate.")
@click.option("--duration", default="10s", show_default=True, callback=_duration, help="Minimum measured time per repeat (60s, 500ms, 2m).")
@click.option("--min-queries", type=int, default=64, show_default=True, help="Minimum queries per repeat.")
@click.option("--max-duration", default=None, callback=_duration, help="Hard cap per repeat; a run cut short is INVALID.")
@click.option("--batch", type=int, default=1, show_default=True, help="Samples per query (fills a dynamic axis 0).")
@click.option("--threads", type=int, default=None, help="Intra-op threads of the backend (default: its own).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Measured runs; results report min/median/max over them.")
@click.option("--warmup", default="1s", show_default=True, callback=_duration, help="Warm-up time, excluded from the statistics.")
@click.option("--samples-per-query", type=int, default=8, show_default=True, help="multi-stream: samples in each query.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="offline/server: concurrent workers.")
@click.option("--target-qps", type=float, default=None, help="server: Poisson arrival rate.")
@click.option("--latency-bound-ms", type=DurationType("ms"), default=None, help="server: p99 bound (100ms, 0.2s; a bare number is ms; default 100ms).")
@click.option("--find-peak", is_flag=True, help="server: search the highest QPS whose p99 holds the bound.")
@click.option("--sweep/--no-sweep", default=True, show_default=True, help="Also measure throughput against concurrency.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the input data and the Poisson schedule.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Size the dynamic axes of an input (repeatable), e.g. input_ids=1,128; axis 0 is the batch.")
@click.option("--data", "data", type=click.Path(dir_okay=False, path_type=Path),
              help="Real inputs: an .npz with one array per input name, axis 0 = samples.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path), envvar="EDGEML_TRUSTED_KEYS",
              show_envvar=True, help="Check the artifact's signature.")
@click.option("-o", "--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write result.json, report.md, report.html and the PNG plots into this folder (each one listed).")
@click.option("--prompt-tokens", type=int, default=64, show_default=True, help="generate: prompt length in tokens.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="generate: tokens generated per sequence.")
@json_option
@handle_errors
def run_cmd(model: Path, scenario: str, duration: float, min_queries: int, max_duration: float | None, batch: int,
            threads: int | None, repeats: int, warmup: float, samples_per_query: int, concurrency: int,
            target_qps: float | None, latency_bound_ms: float | None, find_peak: bool, sweep: bool, seed: int,
            input_shapes: tuple[str, ...], data: Path | None, trusted_keys: tuple[Path, ...], report_dir: Path | None,
            prompt_tokens: int, new_tokens: int, as_json: bool) -> None:
    """Benchmark MODEL (.edgepkg, or .onnx on ONNX Runtime defaults)."""
    if scenario == "generate":    # a text-generation artifact (docs/generation.md)
        from edgeml.benchmarks.generate import bench_artifact, render_bench

        check_trusted_keys(trusted_keys)
        gen = bench_artifact(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, seed=seed,
                             threads=threads, trusted_keys=list(trusted_keys) or None,
                             concurrency=tuple(sorted({1, concurrency if concurrency > 1 else 4})),
                             progress=lambda m: click.echo(f"[bench] {m}", err=True))
        return emit(gen, as_json, render_bench)
    from edgeml.benchmarks.loadgen import BenchSettings, run_benchmark
    from edgeml.benchmarks.report import write_report
    from edgeml.compiler.options import parse_input_shapes

    check_trusted_keys(trusted_keys)
    settings = BenchSettings(
        scenario=scenario, duration_s=duration, min_queries=min_queries, max_duration_s=max_duration, batch=batch,
        threads=threads, repeats=repeats, warmup_s=warmup, samples_per_query=samples_per_query, concurrency=concurrency,
        target_qps=target_qps, latency_bound_ms=latency_bound_ms, find_peak=find_peak, sweep=sweep, seed=seed,
        input_shapes=parse_input_shapes(list(input_shapes)) or None, data=str(data) if data else None,
    ).check()
    kw = {"trusted_keys": list(trusted_keys)} if trusted_keys and model.suffix == ".edgepkg" else {}
    result = run_benchmark(model, settings, progress=lambda m: click.echo(f"[bench] {m}", err=True), **kw)
    if report_dir is not None:
        result["report_files"] = write_report(result, report_dir)
    if as_json:
        from edgeml.benchmarks.report import clean

        emit(clean(result), True)
        return
    click.echo(summary_text(result))


def summary_text(result: dict) -> str:
    from edgeml.benchmarks.report import headline_text

    lat, cs, mem = result["metrics"]["latency_ms"], result["cold_start"], result["memory"]
    v = result["verdict"]
    lines = [f"{result['model']['name']} [{result['model']['backend']}/{result['model']['precision']}] "
             f"{result['scenario']}: {v['result']}"]
    lines += [f"  reason: {r}" for r in v["reasons"]]
    lines.append("  " + headline_text(result).replace("**", ""))
    lines.append("  inputs: " + ", ".join(f"{k} {v['shape']} {v['dtype']}" for k, v in (result.get("inputs_used") or {}).items()))
    lines.append("  latency ms: " + "  ".join(f"{k.replace('_', '.')}={lat[k]:.4g}" for k in ("p50", "p90", "p95", "p99", "p99_9", "max")))
    m = result["metrics"]
    tokens = f" = {m['tokens_per_s']:.0f} tokens/s at sequence length {m['sequence_length']}" if m.get("tokens_per_s") else ""
    lines.append(f"  {m['queries']} queries, {m['samples_per_s']:.1f} samples/s{tokens}; "
                 f"cold start {cs.get('cold_start_ms', float('nan')):.1f} ms; peak RSS {mem.get('peak_rss_mb')} MiB")
    if result.get("qps_search"):
        lines.append(f"  peak QPS under p99 <= {result['qps_search']['latency_bound_ms']:g} ms: {result['qps_search']['peak_qps']}")
    for path in (result.get("report_files") or {}).values():
        lines.append(f"  wrote {path}")
    return "\n".join(lines)


@bench_group.command("compare", epilog=examples(
    "edgeml bench compare a/result.json b/result.json --report cmp/"))
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--label", "labels", multiple=True, help="A name for each result, in order (default: model [backend/precision]).")
@click.option("--noise-floor", type=float, default=0.05, show_default=True,
              help="With a single repeat, relative differences under this are called noise.")
@click.option("-o", "--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write compare.json/.md/.html here.")
@json_option
@handle_errors
def compare_cmd(results: tuple[Path, ...], labels: tuple[str, ...], noise_floor: float, report_dir: Path | None, as_json: bool) -> None:
    """Compare result JSONs against the first one: ratios, spread, within-noise calls."""
    from edgeml.benchmarks.report import compare_markdown, compare_results, load_result, write_compare_report
    from edgeml.errors import UsageError

    if len(results) < 2:
        raise UsageError("compare needs at least two result files")
    if labels and len(labels) != len(results):
        raise UsageError(f"got {len(labels)} --label values for {len(results)} results; give one per result or none")
    loaded = [load_result(p) for p in results]
    cmp = compare_results(loaded, list(labels) or None, noise_floor=noise_floor)
    if report_dir is not None:
        cmp["report_files"] = write_compare_report(cmp, loaded, report_dir)
    if as_json:
        emit(cmp, True)
        return
    click.echo(compare_markdown(cmp))
    for path in (cmp.get("report_files") or {}).values():
        click.echo(f"wrote {path}")
