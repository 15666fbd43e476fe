"""``edgeml compile``: a thin layer over edgeml.compiler.compile_with_report."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import click

from edgeml.backends import backend_names
from edgeml.cli import DurationType, check_output_file, complete_target, emit, examples, handle_errors, json_option


class _Progress:
    """Progress lines on stderr with elapsed time (stdout stays clean for --json)."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {message}", err=True)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send both Python-level and file-descriptor-level stdout to stderr for the block."""
    sys.stdout.flush()
    saved_fd = None
    try:
        if sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2:
            saved_fd = os.dup(1)
            os.dup2(2, 1)
    except (AttributeError, OSError, ValueError):  # CliRunner's capture has no file descriptor
        saved_fd = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _parse_backend_option(values: tuple[str, ...]) -> dict:
    import json

    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            from edgeml.errors import UsageError

            raise UsageError(f"--option {text!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@click.command("compile", epilog=examples(
    "edgeml compile model.onnx -t x86_64 -o model.edgepkg",
    "edgeml compile examples/digits/digits.onnx -t x86_64 --calib examples/digits/calib.npz \\",
    "    --eval examples/digits/eval.npz --name digits-cnn --version 1.0.0 --sign-key signing.key -o digits.edgepkg",
    "edgeml compile model.onnx -t aarch64-a76 --backend tvm --tune-budget 10m -o model-a76.edgepkg",
    "(edgeml targets lists the targets; docs/compiler.md, docs/artifact.md)"))
@click.argument("model")
@click.option("-t", "--target", required=True, shell_complete=complete_target,
              help="Target name (edgeml targets; shell completion lists them).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact to write (.edgepkg).")
@click.option("--precision", default="auto", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8", "int4"]), show_default=True,
              help="auto: every precision the target allows (int8 needs --calib); the fastest within the accuracy"
                   " tolerance wins. int4: --task text-generation only (INT4 weight compression).")
@click.option("--backend", default="auto", type=click.Choice(["auto", *backend_names()]), show_default=True,
              help="auto: every backend the target lists (the null test double only by name).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration .npz keyed by input name.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), help="Eval .npz (+ labels or reference_<output>).")
@click.option("--max-accuracy-drop", default=1.0, type=float, show_default=True, help="Allowed drop in points.")
@click.option("--metric", default="auto", show_default=True,
              type=click.Choice(["auto", "top1", "fp32_agreement", "agreement", "cosine_similarity", "cosine",
                                 "relative_error_score", "relative_error"]),
              help="Accuracy metric; auto: from the output's nature (class scores: argmax agreement, "
                   "embeddings: cosine, else relative error; labels: top1).")
@click.option("--input-shape", "input_shape", multiple=True, help="NAME=1,3,224,224 (repeatable).")
@click.option("--name", help="Artifact name (default: the model's file name).")
@click.option("--version", "version", default="0.1.0", show_default=True, help="Artifact version (SemVer).")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Ed25519 private key (edgeml keygen).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Compile cache folder (default ~/.cache/edgeml/compile).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the compile cache.")
@click.option("--no-benchmark", is_flag=True, help="Do not time candidates (select by the static order).")
@click.option("--benchmark-seconds", default=3.0, type=DurationType("s"), show_default=True,
              help="Time budget of the interleaved candidate benchmark (3s, 500ms; a bare number is seconds).")
@click.option("--keep-fallback", is_flag=True,
              help="Also write OUTPUT-stem.fallback.edgepkg: the best passing candidate of another backend (else "
                   "FP32), served when the primary fails (named by the primary's runtime.fallback).")
@click.option("--prune", "prune", default="",
              help="PyTorch models: also try these fractions of channels pruned (e.g. 0.25,0.5; torch-pruning), "
                   "each fine-tuned on --train and kept only when it wins within the tolerance.")
@click.option("--train", "train", type=click.Path(path_type=Path),
              help="Training .npz for --prune's fine-tune: inputs by name + 'labels' (cross-entropy).")
@click.option("--fine-tune-epochs", default=5, type=int, show_default=True, help="Epochs of --prune's fine-tune.")
@click.option("--tune-budget", help="TVM tuning budget, e.g. 10m (TVM backend only).")
@click.option("--option", "backend_option", multiple=True, help="Backend option KEY=VALUE (JSON values allowed).")
@click.option("--max-memory-mb", type=float, default=None,
              help="Budget: reject a candidate whose serving process peaks above this resident memory (measured in "
                   "a fresh worker at batch 1).")
@click.option("--max-size-mb", type=float, default=None, help="Budget: reject a candidate whose model files weigh more.")
@click.option("--candidate-timeout", "candidate_timeout_s", type=DurationType("s"), default=120.0, show_default=True,
              help="How long a candidate's worker may take per step (load, timing; 2m, 90s; a bare number is"
                   " seconds); evaluation adds its eval budget.")
@click.option("--candidate-memory-mb", type=int, default=None,
              help="Resident memory a candidate's worker may reach before it is killed (default: half of RAM).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@click.option("--task", type=click.Choice(["text-generation"]),
              help="text-generation: MODEL is a Hugging Face decoder folder (docs/generation.md).")
@click.option("--max-perplexity-increase", default=5.0, type=float, show_default=True,
              help="--task text-generation: allowed held-out perplexity increase over FP32, in percent.")
@click.option("--kv-budget-mb", type=float, help="--task text-generation: KV-cache budget (default: 4 full contexts).")
@json_option
@handle_errors
def compile_cmd(model: str, target: str, output: Path, precision: str, backend: str, calib: Path | None,
                eval_path: Path | None, max_accuracy_drop: float, metric: str, input_shape: tuple[str, ...], name: str | None,
                version: str, sign_key: Path | None, cache_dir: Path | None, no_cache: bool, no_benchmark: bool,
                benchmark_seconds: float, keep_fallback: bool, prune: str, train: Path | None,
                fine_tune_epochs: int, tune_budget: str | None, backend_option: tuple[str, ...],
                max_memory_mb: float | None, max_size_mb: float | None, candidate_timeout_s: float,
                candidate_memory_mb: int | None, quiet: bool,
                task: str | None, max_perplexity_increase: float, kv_budget_mb: float | None, as_json: bool) -> None:
    """Compile MODEL (.onnx, .pt2, or pkg.module:factory) into a verified artifact for TARGET."""
    from edgeml.compiler import compile_with_report

    output = check_output_file(output, "--output")  # refuse a bad path (missing folder, /proc) before compiling
    if task == "text-generation":
        from edgeml.compiler import textgen

        with _stdout_to_stderr():
            tg = textgen.compile_text_generation(
                model, target=target, output=output, precision=precision, eval=eval_path, name=name, version=version,
                max_perplexity_increase=max_perplexity_increase, kv_budget_mb=kv_budget_mb, sign_key=sign_key,
                benchmark=not no_benchmark, progress=_Progress(quiet), backend=None if backend in ("auto", "openvino") else backend,
                calib=calib, prune=prune or None, tune_budget=tune_budget, keep_fallback=keep_fallback)
        return emit(tg.to_dict(), as_json, textgen.render)
    extra = _parse_backend_option(backend_option)
    if tune_budget:
        extra["tune_budget"] = tune_budget
    # Libraries (NNCF's progress bars, TVM) print to stdout; keep stdout for the result (--json).
    with _stdout_to_stderr():
        result = compile_with_report(
            model, target=target, output=output, precision=precision, backend=backend, calib=calib,
            eval=eval_path, max_accuracy_drop=max_accuracy_drop, metric=metric, input_shape=list(input_shape) or None, name=name,
            version=version, sign_key=sign_key, cache_dir=cache_dir, use_cache=not no_cache,
            benchmark=not no_benchmark, benchmark_seconds=benchmark_seconds, progress=_Progress(quiet),
            keep_fallback=keep_fallback, prune=prune, train=train, fine_tune_epochs=fine_tune_epochs,
            max_memory_mb=max_memory_mb, max_size_mb=max_size_mb, candidate_timeout_s=candidate_timeout_s,
            candidate_memory_mb=candidate_memory_mb, **extra)
    emit(result.to_dict(), as_json, render)


def render(report: dict) -> str:
    """The human summary: one table row per candidate, then the choice."""
    from edgeml.cli_format import candidate_rows

    lines = candidate_rows(report["candidates"])
    acc = report.get("accuracy") or {}
    sel = report.get("selection") or {}
    lines += [
        "",
        f"selected: {report['backend']['name']}/{report['precision']} ({sel.get('method')}: {sel.get('reason')})",
        f"accuracy ({acc.get('metric')} on {acc.get('samples')} {acc.get('data')} samples): "
        f"fp32 {acc.get('fp32')}  compiled {acc.get('compiled')}  (max drop {acc.get('max_drop')})"
        if acc.get("verified", True) else
        f"accuracy: UNVERIFIED (this host cannot run target {report['target']}); the artifact's self-test "
        f"compares the device's outputs with FP32",
        f"cache: {report['cache']}   time: {report['seconds']:.1f} s",
        f"wrote {report['output']}  ({report['name']} {report['version']}, target {report['target']})",
    ]
    if report.get("fallback"):
        lines.append(f"fallback: {report['fallback']} (beside it; served when the primary fails)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    compile_cmd(sys.argv[1:])
