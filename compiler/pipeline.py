"""The compile pipeline: import, build candidates, verify, benchmark, select, package.

Every candidate is loaded through its backend's *runtime* side (the code a device
runs) from a folder laid out like an extracted artifact, evaluated against the
FP32 reference, benchmarked when this host executes the target, and recorded
in ``manifest["candidates"]`` whatever its fate. The steps below each take the
``CompileSession`` (edgeml.compiler.session) and do one thing.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends import REFERENCE_BACKEND, get_backend, open_backend
from edgeml.backends.base import BuildContext, CandidateSkipped, CandidateSpec
from edgeml.compiler import evaluate as ev
from edgeml.compiler.cache import CompileCache, cache_key, code_fingerprint
from edgeml.compiler.importers import ImportedModel, fingerprint, import_model, is_factory_spec
from edgeml.compiler.manifest import (GOLDEN_SAMPLES, created_timestamp, host_info, latency_budget_ms,
                                      selftest_tolerance, source_date_epoch, tool_versions)
from edgeml.compiler.options import EVAL_BUDGET_S, CompileOptions
from edgeml.compiler.profile import build_profile
from edgeml.compiler.prune import check_options as check_pruning, pruned_models
from edgeml.compiler.select import FINALIST_MARGIN, benchmark as run_benchmark, finalists, select
from edgeml.compiler.session import Candidate, CompileResult, CompileSession, Reference
from edgeml.compiler.worker import CandidateHandle
from edgeml.errors import (AccuracyError, ArtifactError, CandidateFailed, CompileError, DataError, EdgemlError,
                           MissingDependency, RegistryError, UnsupportedOp, UsageError)
from edgeml.runtime.artifact import (SCHEMA_VERSION, SELFTEST_FILE, canonical_json, golden_npz_bytes,
                                     verify_zip, write_artifact)

__all__ = ["EVAL_BUDGET_S", "Candidate", "CompileResult", "compile_with_report"]


def compile_with_report(model: Any, *, target: Any, output: Any, **options: Any) -> CompileResult:
    """Compile ``model`` for ``target`` into ``output``; keywords are compile options or backend options."""
    opts = CompileOptions.from_keywords(model, output, options)
    check_pruning(model, opts.prune, opts.train, opts.fine_tune_epochs, opts.train_loss)
    session = _open_session(opts, target)
    try:
        return _compile(session, model)
    finally:
        session.close()


def _compile(s: CompileSession, model: Any) -> CompileResult:
    # --keep-fallback writes a second file; the compile cache holds one artifact per key
    cache = CompileCache(s.opts.cache_dir) if s.opts.use_cache and not s.opts.keep_fallback else None
    key = _cache_key(s, model, cache)
    if cache is not None:
        hit = _from_cache(s, cache, key)
        if hit is not None:
            return hit
    if s.imported is None:
        s.imported = import_model(model, s.opts.input_shape, s.workdir / "import", progress=s.say)
    s.say(f"model: {len(s.model.inputs)} input(s) {[t.to_dict() for t in s.model.inputs]}")
    s.ref = _measure_reference(s)
    _build_candidates(s, model)
    passing = _passing_candidates(s)
    measured = _benchmark(s, passing)
    chosen, selection = select(passing, measured=measured, backend_order=list(s.target.backends),
                               verified=passing[0].status != "unverified")
    chosen.status = "selected"
    selection["host_runs_target"] = s.target.runs_on_host()
    s.say(f"selected {chosen.spec.label}: {selection['reason']}")
    fallback = None
    if s.opts.keep_fallback:   # compiler/fallback.py: a sibling artifact named by runtime.fallback
        from edgeml.compiler.fallback import write_fallback

        fallback = write_fallback(s, passing, chosen, measured=measured, verified=passing[0].status != "unverified")
    return _package(s, chosen, selection, cache, key, fallback)


# ------------------------------------------------------------------ session and cache


def _open_session(opts: CompileOptions, target: Any) -> CompileSession:
    """Check everything that can be checked before minutes of work, then make the scratch folder."""
    from edgeml.targets import Target, get_target

    tgt = target if isinstance(target, Target) else get_target(str(target))
    opts.target = tgt.name
    _precisions(opts, tgt)
    _backend_names(opts, tgt)
    if opts.sign_key is not None:  # a bad key should fail before minutes of work, not after
        from edgeml.runtime.signing import load_private_key

        load_private_key(opts.sign_key)
    for path, what in ((opts.calib, "calibration"), (opts.eval, "eval")):
        if path is not None and not path.is_file():
            raise DataError(f"{what} file {path} does not exist")
    workdir = Path(tempfile.mkdtemp(prefix="edgeml-compile-"))
    return CompileSession(opts=opts, target=tgt, workdir=workdir, epoch=source_date_epoch(),
                          say=opts.progress or (lambda message: None))


def _cache_key(s: CompileSession, model: Any, cache: CompileCache | None) -> str:
    """The key of every input that affects the artifact's bytes (imports the model when it cannot be hashed)."""
    model_sha = fingerprint(model) if cache is not None else None
    if model_sha is None:
        s.imported = import_model(model, s.opts.input_shape, s.workdir / "import", progress=s.say)
        model_sha = s.imported.sha256
    return cache_key({
        "model": model_sha, "calib": _sha(s.opts.calib), "eval": _sha(s.opts.eval), "options": s.opts.key_dict(),
        "target": s.target.name, "target_file": _target_file_sha(s.target.name), "tools": tool_versions(),
        "code": code_fingerprint(), "source_date_epoch": s.epoch, "schema": SCHEMA_VERSION,
        **({"train": _sha(s.opts.train)} if s.opts.prune else {}),
    })


def _from_cache(s: CompileSession, cache: CompileCache, key: str) -> CompileResult | None:
    hit = cache.get(key)
    if hit is None:
        return None
    try:
        manifest = _emit_from_cache(hit[0], s.opts)
    except ArtifactError as exc:  # a damaged cache entry: compile again
        s.say(f"ignoring a damaged cache entry: {exc.message}")
        return None
    s.say("cache hit: reused the artifact compiled earlier from the same inputs")
    return CompileResult(s.opts.output, manifest, "hit", key, s.elapsed(), hit[1].get("notes", []))


# ------------------------------------------------------------------ the FP32 reference


def _measure_reference(s: CompileSession) -> Reference:
    calib_set, eval_set = _datasets(s.opts, s.model)
    batch = ev.fixed_batch(s.model.inputs)
    s.say(f"FP32 reference on {eval_set.n} {eval_set.source} samples")
    outputs = _reference_outputs(s, eval_set, batch)
    names = [t.name for t in s.model.outputs]
    choice = ev.explain_metric(eval_set, outputs, names, s.opts.metric)
    s.say(f"accuracy metric: {choice.name} ({choice.reason})")
    score = ev.score(choice.name, outputs, outputs, eval_set, names)
    return Reference(eval_set, calib_set, outputs, names, choice.name, score, batch, choice)


def _reference_outputs(s: CompileSession, eval_set: ev.Dataset, batch: int | None) -> dict[str, np.ndarray]:
    """The imported FP32 ONNX model run by the reference backend (errors mapped by that backend's table)."""
    onnx_path = s.model.onnx_path
    backend = {"name": REFERENCE_BACKEND, "version": "", "entrypoint": onnx_path.name,
               "options": {"graph_optimization_level": "all", "providers": ["CPUExecutionProvider"]}}
    runtime = open_backend(REFERENCE_BACKEND, onnx_path.parent, _provisional_manifest(s, backend, "fp32"))
    try:
        return ev.run_batched(runtime.run, eval_set.inputs, batch)
    finally:
        runtime.close()


def _datasets(opts: CompileOptions, imported: ImportedModel) -> tuple[ev.Dataset | None, ev.Dataset]:
    calib = ev.load_dataset(opts.calib, imported.inputs, imported.outputs, "calibration") if opts.calib else None
    if calib is not None:
        calib.source = "calib"
    if opts.eval is not None:
        eval_set = ev.load_dataset(opts.eval, imported.inputs, imported.outputs, "eval")
    elif calib is not None:
        calib, eval_set = ev.split_holdout(calib)
    else:
        eval_set = ev.synthetic_dataset(imported.inputs)
    batch = ev.fixed_batch(imported.inputs)
    if batch and eval_set.n < batch:
        raise DataError(f"the model has a fixed batch of {batch}; the eval data has only {eval_set.n} samples")
    return calib, eval_set


# ------------------------------------------------------------------ candidates


def _build_candidates(s: CompileSession, model: Any) -> None:
    wanted = _collect_candidates(s)
    _collect_pruned_candidates(s, model, wanted)
    for c in s.candidates:
        assert c.context is not None
        _build_and_check(s, c, c.context)


def _collect_pruned_candidates(s: CompileSession, model: Any, wanted: list[str]) -> None:
    """--prune: every backend's candidates again for each pruned model, labelled ``.../prunedNN``."""
    pruned = pruned_models(model, s.opts, s.model.inputs, s.model.outputs, s.workdir / "prune",
                           s.epoch is not None, s.say)
    dense = [c for c in s.candidates if c.context is not None]
    for variant in pruned:
        for c in dense:
            assert c.context is not None
            ctx = dataclasses.replace(c.context, onnx_path=variant.imported.onnx_path,
                                      workdir=s.workdir / "build" / variant.tag)
            ctx.workdir.mkdir(parents=True, exist_ok=True)
            spec = dataclasses.replace(c.spec, label=f"{c.spec.label}+{variant.tag}")
            s.candidates.append(Candidate(len(s.candidates), spec, backend_version=c.backend_version,
                                          context=ctx, pruning=variant.recipe))


def _collect_candidates(s: CompileSession) -> list[str]:
    """Ask each backend for its candidates (each keeps its backend's build context); returns the precisions."""
    wanted = _precisions(s.opts, s.target)
    if "int8" in wanted and s.reference.calib_set is None:
        wanted.remove("int8")
        s.skipped.append({"label": "*/int8", "backend": None, "precision": "int8", "status": "skipped",
                          "selected": False, "reason": "no calibration data (pass --calib to try int8)"})
    base = _build_context(s)
    for name in _backend_names(s.opts, s.target):
        ctx = dataclasses.replace(base, options=s.opts.options_for(name))
        offered = _offered_candidates(s, name, ctx, wanted)
        if offered is None:
            continue
        specs, version = offered
        if not specs:
            s.skipped.append(_skip(name, f"offers no candidate for target {s.target.name} among {wanted}"))
        for spec in specs:
            if not spec.label:
                spec = CandidateSpec(spec.backend, spec.precision, spec.recipe, f"{spec.backend}/{spec.precision}")
            s.candidates.append(Candidate(len(s.candidates), spec, backend_version=version, context=ctx))
    return wanted


def _offered_candidates(s: CompileSession, name: str, ctx: BuildContext,
                        wanted: list[str]) -> tuple[list[CandidateSpec], str] | None:
    """(specs, backend version), or None when the backend is unavailable here (recorded as skipped)."""
    try:
        impl = get_backend(name).compiler()
    except (ImportError, AttributeError, RegistryError) as exc:
        s.skipped.append(_skip(name, f"backend module unavailable: {exc}"))
        return None
    why = impl.unavailable_reason()
    if why:
        if s.opts.backend == name:
            raise MissingDependency(f"backend {name} is unavailable: {why}", hint="pip install 'edgeml[compiler]'")
        s.skipped.append(_skip(name, why))
        return None
    try:
        return impl.candidates(ctx, wanted), impl.version()
    except EdgemlError:
        raise
    except Exception as exc:  # a broken optional backend must not stop the others
        s.skipped.append(_skip(name, f"{type(exc).__name__}: {exc}"))
        return None


def _build_context(s: CompileSession) -> BuildContext:
    ref = s.reference
    ctx = BuildContext(onnx_path=s.model.onnx_path, target=s.target, inputs=s.model.inputs,
                       outputs=s.model.outputs, workdir=s.workdir / "build",
                       calib=ref.calib_set.inputs if ref.calib_set else None,
                       reference=ref.for_builders(s.opts.max_accuracy_drop), progress=s.say)
    ctx.workdir.mkdir()

    def evaluate_files(files_dir: Path, fragment: dict[str, Any]) -> float:
        """The pipeline's own measurement, for backends that search (accuracy-aware int8), in a worker."""
        manifest = _provisional_manifest(s, fragment["backend"], fragment.get("precision", "int8"))
        handle = s.pool.open(fragment["backend"]["name"], Path(files_dir), manifest, s.threads)
        try:
            return ref.score_of(handle.evaluate(ref.eval_set.inputs, ref.batch, None)).value
        finally:
            handle.close()

    ctx.evaluate = evaluate_files
    return ctx


def _skip(backend: str, reason: str) -> dict[str, Any]:
    return {"label": f"{backend}/*", "backend": backend, "precision": None, "status": "skipped",
            "selected": False, "reason": reason}


def _provisional_manifest(s: CompileSession, backend: dict[str, Any], precision: str) -> dict[str, Any]:
    tgt = s.target
    return {"schema_version": SCHEMA_VERSION, "name": "candidate", "version": "0.0.0", "target": tgt.name,
            "required_features": list(tgt.required_features), "arch": tgt.arch, "backend": backend,
            "precision": precision, "inputs": [t.to_dict() for t in s.model.inputs],
            "outputs": [t.to_dict() for t in s.model.outputs], "files": {}}


def _build_and_check(s: CompileSession, c: Candidate, ctx: BuildContext) -> None:
    if not _build(s, c, ctx):
        return
    assert c.built is not None
    folder = _lay_out(s, c)
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    c.size_mb = round(size_mb, 6)
    if s.opts.max_size_mb is not None and size_mb > s.opts.max_size_mb:
        c.status, c.reason = "rejected", f"its files take {c.size_mb:g} MB (> {s.opts.max_size_mb:g} MB allowed: max_size_mb)"
        s.say(f"  {c.spec.label}: {c.reason}")
        return
    backend = {"name": c.spec.backend, "version": c.backend_version, "entrypoint": c.built.entrypoint,
               "options": c.built.backend_options}
    manifest = _provisional_manifest(s, backend, c.spec.precision)
    (folder / "manifest.json").write_bytes(canonical_json(manifest))
    outputs = _run_on_eval(s, c, folder, manifest)
    if outputs is not None:
        _judge(s, c, outputs)
        if s.opts.max_memory_mb is not None and (c.status == "passed" or c.host_check is not None):
            _check_memory(s, c, folder, manifest)   # measured here (with this host's kernels for host checks)
    elif s.opts.max_memory_mb is not None and c.status == "unverified":
        c.reason = f"{c.reason}; its memory could not be measured here either (max_memory_mb not checked)"


def _check_memory(s: CompileSession, c: Candidate, folder: Path, manifest: dict[str, Any]) -> None:
    """Budget: the candidate's serving process, measured in a fresh worker at batch 1, must fit."""
    budget = s.opts.max_memory_mb
    assert budget is not None
    try:
        c.memory = s.pool.memory_profile(c.spec.backend, folder, manifest, s.threads, s.reference.eval_set.inputs,
                                         s.reference.batch or 1)
    except EdgemlError as exc:
        c.status, c.reason = "failed", f"memory measurement failed: {exc.message}"
        c.close_runtime()
        return
    peak = (c.memory or {}).get("run_peak_mb")
    if peak is not None and peak > budget:
        c.status = "rejected"
        c.reason = (f"its serving process peaks at {peak:g} MB resident (> {budget:g} MB allowed: max_memory_mb; "
                    f"{c.memory['baseline_mb'] if c.memory else 0:g} MB of it is the Python runtime itself)")
        c.close_runtime()
        s.say(f"  {c.spec.label}: {c.reason}")


def _build(s: CompileSession, c: Candidate, ctx: BuildContext) -> bool:
    """Build one candidate; False when it was skipped or failed (status and reason recorded)."""
    s.say(f"building {c.spec.label}")
    try:
        c.built = get_backend(c.spec.backend).compiler().build(c.spec, ctx)
    except CandidateSkipped as exc:
        c.status, c.reason = "skipped", str(exc)
        s.say(f"  {c.spec.label}: skipped ({exc})")
        return False
    except EdgemlError as exc:
        c.status, c.reason, c.error = "failed", f"build failed: {exc.message}", exc
        return False
    except Exception as exc:  # a library error the backend's table did not map
        c.status, c.reason = "failed", f"build failed: {type(exc).__name__}: {str(exc)[:400]}"
        return False
    return True


def _lay_out(s: CompileSession, c: Candidate) -> Path:
    """Copy the built members into a folder laid out like an extracted artifact."""
    assert c.built is not None
    folder = s.workdir / "candidates" / str(c.index)
    for member, src in c.built.files.items():
        dest = folder / member
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)
    return folder


def _run_on_eval(s: CompileSession, c: Candidate, folder: Path,
                 manifest: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Load in a worker and run the eval split; None when it cannot or may not run here (failed / unverified)."""
    ref = s.reference
    plan, missing = execution_plan(s.target, c.spec.backend)
    c.verification = _verification(plan, missing, s.opts.isolation)
    if plan == "none":
        c.status, c.reason = "unverified", f"not run on this host: {_why_not_run(s.target, c.spec.backend, missing)}"
        s.say(f"  {c.spec.label}: unverified ({c.reason})")
        return None
    try:
        c.runtime = s.pool.open(c.spec.backend, folder, manifest, s.threads)
        return c.runtime.evaluate(ref.eval_set.inputs, ref.batch, s.opts.eval_budget_s)
    except CandidateFailed as exc:  # its worker crashed, hung or ran out of memory: this candidate only
        c.status, c.reason = "failed", f"worker {exc.message}{_sigill_note(exc, s.target)}"
        s.say(f"  {c.spec.label}: failed ({c.reason})")
    except Exception as exc:  # EdgemlError or a backend's own
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {str(exc)[:300]}"
        if not s.target.runs_on_host():
            c.status, c.reason = "unverified", f"cannot run on this host to measure accuracy: {message}"
        else:
            c.status, c.reason = "failed", f"runtime check failed: {message}"
            c.error = exc if isinstance(exc, EdgemlError) else None
    _note_memory(c)
    c.close_runtime()
    return None


def execution_plan(target: Any, backend: str) -> tuple[str, list[str]]:
    """How a candidate may run here: ``full`` (the target's code on a host that has every feature it needs),
    ``host-kernels`` (a portable runtime on a CPU host lacking some target features: an indication only), or
    ``none`` (another arch, a device this host lacks, or native code built for features this host lacks)."""
    missing = target.missing_features()
    if not missing:
        return "full", []
    if target.device != "cpu" or any(m.startswith("arch:") for m in missing):
        return "none", missing
    return ("host-kernels" if get_backend(backend).portable_code else "none"), missing


def _verification(plan: str, missing: list[str], isolation: str) -> dict[str, Any]:
    from edgeml.targets import host_isa, masked_features

    record: dict[str, Any] = {"where": None if plan == "none" else "compile host",
                              "kernels": {"full": "the target's", "host-kernels": "this host's",
                                          "none": None}[plan],
                              "host_isa": host_isa(), "target_features_missing_here": missing,
                              "complete": plan == "full"}
    if plan != "none":
        record["isolation"] = "worker process" if isolation == "process" else "in process"
    masked = masked_features()
    if masked:
        record["host_features_masked"] = masked
    return record


def _why_not_run(target: Any, backend: str, missing: list[str]) -> str:
    from edgeml.targets import host_arch

    arch = [m for m in missing if m.startswith("arch:")]
    if arch:
        return f"the target is {target.arch}, this host is {host_arch()}"
    if target.device != "cpu":
        return f"the target runs on a {target.device} device ({', '.join(missing)}), which this host lacks"
    return (f"{backend} built native code for {', '.join(missing)}, which this host lacks "
            "(running it would execute illegal instructions)")


def _sigill_note(exc: CandidateFailed, target: Any) -> str:
    if exc.signal != "SIGILL":
        return ""
    from edgeml.targets import host_isa

    return f" (target {target.name} needs {', '.join(target.required_features)}; this host runs {host_isa()})"


def _note_memory(c: Candidate) -> None:
    peak = c.runtime.peak_rss_mb() if isinstance(c.runtime, CandidateHandle) else None
    if peak is not None:
        c.peak_rss_mb = max(c.peak_rss_mb or 0.0, peak)


def _judge(s: CompileSession, c: Candidate, out: dict[str, np.ndarray]) -> None:
    """Score against FP32 (on the samples it ran) and pass or reject by the tolerance."""
    ref, tolerance = s.reference, s.opts.max_accuracy_drop
    assert c.built is not None
    c.score = ref.score_of(out)
    fp32_score = ref.score
    done = len(out[ref.output_names[0]])
    if done < ref.eval_set.n:  # too slow for the whole eval split: compare with FP32 on the same samples
        c.eval_samples = done
        c.built.notes.append(f"evaluated on the first {done} of {ref.eval_set.n} eval samples "
                             f"(eval budget {s.opts.eval_budget_s:g} s; option eval_budget_s)")
        fp32_score = ref.score_of({k: v[:done] for k, v in ref.outputs.items()})
    c.drop = fp32_score.value - c.score.value
    _note_memory(c)
    if c.drop > tolerance + 1e-9:
        c.status = "rejected"
        c.reason = f"{ref.metric} drops {c.drop:.2f} points (> {tolerance:g} allowed)"
        c.close_runtime()
    else:
        c.status = "passed"
    if c.verification is not None and not c.verification["complete"]:
        _indicative_only(s, c, fp32_score.value)
    s.say(f"  {c.spec.label}: {ref.metric} {c.score.value:.2f} (FP32 {fp32_score.value:.2f}) -> {c.status}")


def _indicative_only(s: CompileSession, c: Candidate, fp32_value: float) -> None:
    """Measured with this host's kernels, not the target's: an indication, recorded as ``unverified``."""
    assert c.verification is not None and c.score is not None and c.drop is not None
    c.host_check = c.status
    missing = ", ".join(c.verification["target_features_missing_here"])
    verdict = "within" if c.status == "passed" else "over"
    c.status = "unverified"
    c.reason = (f"measured on this host with its own {c.verification['host_isa']} kernels, not the target's "
                f"(this host lacks {missing}): {s.reference.metric} {c.score.value:.2f} vs FP32 {fp32_value:.2f}, "
                f"drop {c.drop:.2f} points, {verdict} the {s.opts.max_accuracy_drop:g} allowed; indicative only")
    c.close_runtime()


# ------------------------------------------------------------------ selection


def _passing_candidates(s: CompileSession) -> list[Candidate]:
    passing = [c for c in s.candidates if c.status == "passed"]
    if passing:
        return passing
    unverified = [c for c in s.candidates if c.status == "unverified"]
    if not (unverified and not s.target.runs_on_host()):
        raise _no_candidate_error(s.candidates, s.skipped, s.opts.max_accuracy_drop)
    # Nothing for this target runs here (e.g. an OpenCL GPU): ship the static-order choice, marked
    # unverified; its self-test compares the device's outputs with the FP32 reference.
    s.say("no candidate runs on this host: choosing by the static order, accuracy unverified")
    return unverified


def _benchmark(s: CompileSession, passing: list[Candidate]) -> bool:
    """Time the passing candidates when this host runs the target; True when it did.

    A candidate whose worker dies while timed is marked failed and the others are timed again.
    """
    if not (s.target.runs_on_host() and s.opts.benchmark):
        return False
    ref = s.reference
    s.say(f"benchmarking {len(passing)} candidate(s) at batch {ref.batch or 1} (~{s.opts.benchmark_seconds:g} s)")
    while passing:
        try:
            for c in passing:
                c.runtime.set_bench_feeds(ref.eval_set.inputs, ref.batch or 1)
            timings = run_benchmark({str(c.index): c.runtime for c in passing}, seconds=s.opts.benchmark_seconds)
        except CandidateFailed as exc:
            dead = [c for c in passing if _worker_dead(c)] or passing[:1]
            for c in dead:
                c.status, c.reason = "failed", f"worker {exc.message} (while benchmarking)"
                c.close_runtime()
                passing.remove(c)
            continue
        for c in passing:
            c.latency = timings[str(c.index)]
            _note_memory(c)
        _try_one_thread(s, passing)
        _remeasure_finalists(s, passing)
        return True
    raise _no_candidate_error(s.candidates, s.skipped, s.opts.max_accuracy_drop)


TINY_MS = 0.2   # below this p50, thread start-up and spinning cost more than parallel kernels save


def _try_one_thread(s: CompileSession, passing: list[Candidate]) -> None:
    """Tiny models: the fastest ONNX Runtime candidate timed again beside itself with one intra-op thread and no
    spinning (same files, a second worker); the faster setting becomes the candidate's (``threads`` and
    ``thread_choice`` in its entry, ``runtime.threads`` in the manifest when it is selected)."""
    timed = [c for c in passing if c.latency and c.spec.backend == "onnxruntime" and c.built is not None]
    if not timed or s.threads == 1 or s.epoch is not None:   # a reproducible build keeps its pinned setting
        return
    best = min(timed, key=lambda c: c.latency["p50"] if c.latency else float("inf"))
    if best.latency is None or best.latency["p50"] > TINY_MS or best.built is None:
        return
    options = {**best.built.backend_options, "allow_spinning": False}
    backend = {"name": best.spec.backend, "version": best.backend_version, "entrypoint": best.built.entrypoint,
               "options": options}
    folder = s.workdir / "candidates" / str(best.index)
    try:
        one = s.pool.open(best.spec.backend, folder, _provisional_manifest(s, backend, best.spec.precision), 1)
    except EdgemlError as exc:
        s.say(f"  one-thread setting of {best.spec.label} not measured: {exc.message}")
        return
    try:
        one.set_bench_feeds(s.reference.eval_set.inputs, s.reference.batch or 1)
        pair = run_benchmark({"all": best.runtime, "one": one}, seconds=s.opts.benchmark_seconds)
    except EdgemlError as exc:
        s.say(f"  one-thread setting of {best.spec.label} not measured: {exc.message}")
        one.close()
        return
    best.thread_choice = {"default_p50": pair["all"]["p50"], "one_thread_p50": pair["one"]["p50"]}
    if pair["one"]["p50"] < pair["all"]["p50"]:
        best.close_runtime()
        best.runtime, best.threads, best.latency = one, 1, pair["one"]
        best.built.backend_options = options
        best.built.notes.append(f"one intra-op thread without spinning: {pair['one']['p50']:.4f} ms vs "
                                f"{pair['all']['p50']:.4f} ms with the default threads (measured, side by side)")
        s.say(f"  {best.spec.label}: one thread without spinning is faster here")
    else:
        best.latency = pair["all"]
        one.close()


def _remeasure_finalists(s: CompileSession, passing: list[Candidate]) -> None:
    """Candidates within the margin of the fastest are timed again, for twice as long: that decides."""
    by_label = {str(c.index): c for c in passing}
    close = finalists({label: c.latency for label, c in by_label.items() if c.latency})
    if len(close) < 2:
        return
    names = ", ".join(by_label[label].spec.label for label in close)
    s.say(f"re-measuring {len(close)} finalists within {FINALIST_MARGIN:.0%} of the fastest: {names}")
    try:
        again = run_benchmark({label: by_label[label].runtime for label in close},
                              seconds=2 * s.opts.benchmark_seconds)
    except CandidateFailed:  # keep the first measurement; a worker that died is caught when it runs again
        return
    for label in close:
        c = by_label[label]
        c.latency = {**again[label], "first_p50": c.latency["p50"] if c.latency else None, "remeasured": True}


def _worker_dead(c: Candidate) -> bool:
    proc = getattr(c.runtime, "proc", None)
    return proc is None or bool(getattr(proc, "dead", False))


def _no_candidate_error(cands: list[Candidate], skipped: list[dict[str, Any]], tolerance: float) -> EdgemlError:
    lines = [f"{c.spec.label}: {c.status}: {c.reason}" for c in cands] + \
            [f"{s['label']}: skipped: {s['reason']}" for s in skipped]
    detail = "; ".join(lines) or "no backend offered a candidate"
    unsupported = [c.error for c in cands if isinstance(c.error, UnsupportedOp)]
    if cands and len(unsupported) == len(cands):
        first = unsupported[0]
        return UnsupportedOp(first.message + (f" (all candidates failed: {detail})" if len(cands) > 1 else ""),
                             hint=first.hint)
    budget = [c for c in cands if c.status == "rejected" and "allowed: max_" in (c.reason or "")]
    if budget and all(c.status in ("rejected", "failed", "skipped") for c in cands):
        return CompileError(f"no candidate fits the budgets: {detail}",
                            hint="raise --max-memory-mb / --max-size-mb, or try --precision int8 for a smaller model")
    if any(c.status == "rejected" for c in cands):
        return AccuracyError(f"no candidate kept accuracy within {tolerance:g} points: {detail}",
                             hint="raise --max-accuracy-drop, give more --calib data, or use --precision fp32")
    if any(c.status == "unverified" for c in cands):
        return CompileError(f"no candidate could be verified on this host: {detail}")
    return CompileError(f"no candidate could be built: {detail}")


def _precisions(opts: CompileOptions, tgt: Any) -> list[str]:
    allowed = list(tgt.precisions)
    if opts.precision == "auto":
        return allowed
    if opts.precision not in allowed:
        raise UsageError(f"target '{tgt.name}' does not support precision {opts.precision}",
                         hint=f"choose one of {allowed} or --precision auto")
    if opts.precision == "int8" and opts.calib is None:
        raise UsageError("--precision int8 needs calibration data", hint="pass --calib CALIB.npz")
    return [opts.precision]


def _backend_names(opts: CompileOptions, tgt: Any) -> list[str]:
    """``auto``: the target's backends that take part in auto; a name: that backend, if it serves the target."""
    if opts.backend == "auto":
        return [name for name in tgt.backends if get_backend(name).auto]
    if opts.backend not in tgt.backends and not get_backend(opts.backend).any_target:
        raise UsageError(f"target '{tgt.name}' is not served by backend {opts.backend}",
                         hint=f"choose one of {list(tgt.backends)} or --backend auto")
    return [opts.backend]


def _sha(path: Path | None) -> str | None:
    return ev.file_sha256(path) if path is not None else None


def _target_file_sha(name: str) -> str:
    from edgeml.targets import TARGET_DIR

    path = TARGET_DIR / f"{name}.toml"
    return ev.file_sha256(path) if path.is_file() else name


# ------------------------------------------------------------------ packaging


def _package(s: CompileSession, chosen: Candidate, selection: dict[str, Any], cache: CompileCache | None,
             key: str, fallback: str | None = None) -> CompileResult:
    assert chosen.built is not None
    manifest, golden = _manifest(s, chosen, selection)
    if fallback is not None:
        manifest["runtime"]["fallback"] = fallback
    files: dict[str, Any] = dict(chosen.built.files)
    files[SELFTEST_FILE] = golden
    unsigned = s.workdir / "unsigned.edgepkg"
    write_artifact(unsigned, dict(manifest), files)
    if cache is not None:
        cache.put(key, unsigned, {"notes": s.model.notes, "manifest_name": manifest["name"]})
    manifest = _emit_from_cache(unsigned, s.opts)
    s.say(f"wrote {s.opts.output}")
    return CompileResult(s.opts.output, manifest, "miss" if cache is not None else "disabled", key, s.elapsed(),
                         s.model.notes)


def _golden(s: CompileSession, chosen: Candidate) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Self-test inputs and the outputs the device must reproduce (the compiled model's, or FP32's)."""
    ref = s.reference
    k = ref.batch or min(GOLDEN_SAMPLES, ref.eval_set.n)
    golden_in = {n: np.ascontiguousarray(a[:k]) for n, a in ref.eval_set.inputs.items()}
    if chosen.runtime is not None:
        return golden_in, chosen.runtime.run(golden_in)
    return golden_in, {n: np.ascontiguousarray(a[:k]) for n, a in ref.outputs.items()}


def _accuracy(s: CompileSession, chosen: Candidate, verified: bool) -> dict[str, Any]:
    ref = s.reference
    score = chosen.score if verified else None
    return {"metric": ref.metric, "metric_choice": ref.metric_choice.to_dict() if ref.metric_choice else None,
            "fp32": round(ref.score.value, 4), "verified": verified,
            "compiled": round(score.value, 4) if score else None,
            "drop": round(chosen.drop, 4) if verified and chosen.drop is not None else None,
            "max_drop": s.opts.max_accuracy_drop, "data": ref.eval_set.source, "samples": ref.eval_set.n,
            "max_abs_error": float(f"{score.max_abs_error:.4g}") if score else None}


def _manifest(s: CompileSession, chosen: Candidate, selection: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    assert chosen.built is not None
    ref, tgt, opts, imported = s.reference, s.target, s.opts, s.model
    reproducible = s.epoch is not None
    verified = chosen.runtime is not None
    golden_in, golden_out = _golden(s, chosen)
    rtol, atol = selftest_tolerance(chosen.spec.precision, golden_out)
    p90 = chosen.latency["p90"] if chosen.latency else None
    precision = chosen.spec.precision
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": opts.name or _default_name(opts.model),
        "version": opts.version,
        "target": tgt.name,
        "arch": tgt.arch,
        "device": tgt.device,
        "required_features": list(tgt.required_features),
        "backend": {"name": chosen.spec.backend, "version": chosen.backend_version,
                    "entrypoint": chosen.built.entrypoint, "options": chosen.built.backend_options},
        "precision": precision,
        "quantization": None if precision == "fp32" else chosen.recipe,
        "inputs": [t.to_dict() for t in imported.inputs],
        "outputs": [t.to_dict() for t in imported.outputs],
        "candidates": [c.to_dict(reproducible) for c in s.candidates] + s.skipped,
        "selection": selection,
        "accuracy": _accuracy(s, chosen, verified),
        "provenance": {
            "source_model": imported.source,
            "calibration": ref.calib_set.describe() if ref.calib_set else None,
            "eval": ref.eval_set.describe(),
            "tools": tool_versions(),
            "options": opts.key_dict(),
            "created": created_timestamp(s.epoch),
            "reproducible": reproducible,
            "host": host_info(),
            "import_notes": imported.notes,
        },
        "runtime": {"threads": chosen.threads or tgt.default_threads or None},
        "selftest": {"file": SELFTEST_FILE, "samples": len(next(iter(golden_in.values()))), "rtol": rtol,
                     "atol": atol, "reference": "compiled" if verified else "fp32",
                     "latency_budget_ms": None if reproducible else latency_budget_ms(p90)},
        **({"pruning": chosen.pruning.to_dict(reproducible) if chosen.pruning else None} if opts.prune else {}),
        "drift_profile": build_profile(ref.outputs, ref.eval_set.inputs, [t.name for t in imported.outputs],
                                       source=ref.eval_set.source),
    }
    return manifest, golden_npz_bytes(golden_in, golden_out)


def _default_name(model: str) -> str:
    import re

    if is_factory_spec(model):
        base = model.split(":")[-1]
    elif model.startswith("<"):
        base = "model"
    else:
        base = Path(model).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _emit_from_cache(cached: Path, opts: CompileOptions) -> dict[str, Any]:
    """Write the output from a verified unsigned artifact, signing it when asked."""
    manifest, contents, _, raw = verify_zip(cached)
    if opts.sign_key is None:
        from edgeml.runtime.fsutil import atomic_path

        if Path(cached).resolve() != opts.output.resolve():
            with atomic_path(opts.output) as tmp:
                shutil.copyfile(cached, tmp)
        return manifest
    files = {name: data for name, data in contents.items()}
    write_artifact(opts.output, manifest, files, sign_key=opts.sign_key)
    return manifest
