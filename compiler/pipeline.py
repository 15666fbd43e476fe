"""The compile pipeline: import, build candidates, verify, benchmark, select, package.

Every candidate is loaded through the *runtime* backend (the code a device
runs) from a folder laid out like an extracted artifact, evaluated against the
FP32 reference, benchmarked when this host executes the target, and recorded
in ``manifest["candidates"]`` whatever its fate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.compiler import evaluate as ev
from edgeml.compiler.backends import COMPILER_BACKENDS, BuildContext, BuiltCandidate, CandidateSpec
from edgeml.compiler.cache import CompileCache, cache_key, code_fingerprint
from edgeml.compiler.importers import ImportedModel, fingerprint, import_model, is_factory_spec
from edgeml.compiler.manifest import (GOLDEN_SAMPLES, created_timestamp, host_info, latency_budget_ms,
                                      selftest_tolerance, source_date_epoch, tool_versions)
from edgeml.compiler.options import CompileOptions
from edgeml.compiler.select import CandidateSkipped, benchmark as run_benchmark, select
from edgeml.errors import (AccuracyError, ArtifactError, CompileError, EdgemlError, MissingDependency, RegistryError,
                           UnsupportedOp, UsageError)
from edgeml.runtime.artifact import (SCHEMA_VERSION, SELFTEST_FILE, canonical_json, golden_npz_bytes,
                                     verify_zip, write_artifact)
from edgeml.runtime.backends import RuntimeBackend, open_backend


EVAL_BUDGET_S = 120.0   # per candidate; a slower one is scored on the samples it ran in that time


@dataclass
class Candidate:
    index: int
    spec: CandidateSpec
    status: str = "pending"       # selected | passed | rejected | failed | unverified | skipped
    reason: str | None = None
    built: BuiltCandidate | None = None
    runtime: RuntimeBackend | None = None
    backend_version: str = ""
    score: ev.Score | None = None
    drop: float | None = None
    latency: dict[str, float] | None = None
    error: EdgemlError | None = None
    eval_samples: int | None = None  # set when evaluated on fewer than all eval samples

    @property
    def recipe(self) -> dict[str, Any]:
        return self.built.recipe if self.built else dict(self.spec.recipe)

    def to_dict(self, reproducible: bool) -> dict[str, Any]:
        return {
            "label": self.spec.label or f"{self.spec.backend}/{self.spec.precision}",
            "backend": self.spec.backend,
            "backend_version": self.backend_version,
            "precision": self.spec.precision,
            "recipe": self.recipe,
            "status": self.status,
            "selected": self.status == "selected",
            "reason": self.reason,
            "accuracy": None if self.score is None else round(self.score.value, 4),
            "accuracy_drop": None if self.drop is None else round(self.drop, 4),
            "max_abs_error": None if self.score is None else float(f"{self.score.max_abs_error:.4g}"),
            "eval_samples": self.eval_samples,
            "latency_ms": None if reproducible else self.latency,
            "build_seconds": None if (reproducible or not self.built) else round(self.built.build_seconds, 3),
            "notes": list(self.built.notes) if self.built else [],
        }


@dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]
    cache: str                    # hit | miss | disabled
    cache_key: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return self.manifest.get("candidates", [])

    @property
    def selected(self) -> dict[str, Any] | None:
        return next((c for c in self.candidates if c.get("selected")), None)

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"output": str(self.path), "cache": self.cache, "cache_key": self.cache_key,
                "seconds": round(self.seconds, 3), "name": m["name"], "version": m["version"],
                "target": m["target"], "backend": m["backend"], "precision": m["precision"],
                "quantization": m.get("quantization"), "accuracy": m.get("accuracy"),
                "selection": m.get("selection"), "selected": self.selected, "candidates": self.candidates,
                "notes": self.notes}


def compile_with_report(model: Any, *, target: Any, output: Any, precision: str = "auto", backend: str = "auto",
                        calib: Any = None, eval: Any = None, max_accuracy_drop: float = 1.0,  # noqa: A002
                        input_shape: Any = None, name: str | None = None, version: str = "0.1.0",
                        sign_key: Any = None, cache_dir: Any = None, use_cache: bool = True,
                        benchmark: bool = True, benchmark_seconds: float = 3.0, progress: Any = None,
                        **backend_options: Any) -> CompileResult:
    from edgeml.compiler.options import parse_input_shapes
    from edgeml.targets import Target, get_target

    start = time.perf_counter()
    opts = CompileOptions(
        model=str(model) if isinstance(model, (str, Path)) else f"<{type(model).__name__}>", target="",
        output=Path(output), precision=precision, backend=backend, calib=calib, eval=eval,
        max_accuracy_drop=max_accuracy_drop, input_shape=parse_input_shapes(input_shape), name=name,
        version=version, sign_key=sign_key, cache_dir=cache_dir, use_cache=use_cache, benchmark=benchmark,
        benchmark_seconds=benchmark_seconds, progress=progress, backend_options=dict(backend_options),
    ).validate()
    tgt = target if isinstance(target, Target) else get_target(str(target))
    opts.target = tgt.name
    say = opts.progress or (lambda message: None)
    epoch = source_date_epoch()
    precisions = _precisions(opts, tgt)
    backends = _backend_names(opts, tgt)
    if opts.sign_key is not None:  # a bad key should fail before minutes of work, not after
        from edgeml.runtime.signing import load_private_key

        load_private_key(opts.sign_key)
    for path, what in ((opts.calib, "calibration"), (opts.eval, "eval")):
        if path is not None and not path.is_file():
            from edgeml.errors import DataError

            raise DataError(f"{what} file {path} does not exist")
    workdir = Path(tempfile.mkdtemp(prefix="edgeml-compile-"))
    cands: list[Candidate] = []
    try:
        cache = CompileCache(opts.cache_dir) if opts.use_cache else None
        key_parts = {
            "calib": _sha(opts.calib), "eval": _sha(opts.eval), "options": opts.key_dict(), "target": tgt.name,
            "target_file": _target_file_sha(tgt.name), "tools": tool_versions(), "code": code_fingerprint(), "source_date_epoch": epoch,
            "schema": SCHEMA_VERSION,
        }
        imported: ImportedModel | None = None
        model_sha = fingerprint(model) if cache is not None else None
        if model_sha is None:
            imported = import_model(model, opts.input_shape, workdir / "import", progress=say)
            model_sha = imported.sha256
        key = cache_key({"model": model_sha, **key_parts})
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                try:
                    manifest = _emit_from_cache(hit[0], opts)
                except ArtifactError as exc:  # a damaged cache entry: compile again
                    say(f"ignoring a damaged cache entry: {exc.message}")
                else:
                    say("cache hit: reused the artifact compiled earlier from the same inputs")
                    return CompileResult(opts.output, manifest, "hit", key, time.perf_counter() - start,
                                         hit[1].get("notes", []))
        if imported is None:
            imported = import_model(model, opts.input_shape, workdir / "import", progress=say)
        say(f"model: {len(imported.inputs)} input(s) {[s.to_dict() for s in imported.inputs]}")
        calib_set, eval_set = _datasets(opts, imported)
        batch = ev.fixed_batch(imported.inputs)
        say(f"FP32 reference on {eval_set.n} {eval_set.source} samples")
        fp32_out = _reference_outputs(imported, eval_set, batch)
        names_out = [s.name for s in imported.outputs]
        metric = ev.choose_metric(eval_set, fp32_out, names_out)
        fp32_score = ev.score(metric, fp32_out, fp32_out, eval_set, names_out)
        ctx = BuildContext(onnx_path=imported.onnx_path, target=tgt, inputs=imported.inputs,
                           outputs=imported.outputs, workdir=workdir / "build",
                           calib=calib_set.inputs if calib_set else None,
                           options={**opts.backend_options, "max_accuracy_drop": opts.max_accuracy_drop,
                                    "eval_data": eval_set, "metric": metric, "fp32_score": fp32_score.value},
                           progress=say)
        ctx.workdir.mkdir()
        threads = tgt.default_threads or None

        def evaluate_files(files_dir: Path, fragment: dict[str, Any]) -> float:
            manifest = _provisional_manifest(tgt, imported, fragment["backend"], fragment.get("precision", "int8"))
            rt = open_backend(fragment["backend"]["name"], Path(files_dir), manifest, threads=threads)
            try:
                return ev.score(metric, ev.run_batched(rt.run, eval_set.inputs, batch), fp32_out, eval_set,
                                names_out).value
            finally:
                rt.close()

        ctx.evaluate = evaluate_files
        skipped = _collect_candidates(backends, precisions, ctx, cands, opts, calib_set is not None)
        for c in cands:
            _build_and_check(c, ctx, workdir, imported, threads, eval_set, batch, fp32_out, fp32_score,
                             metric, names_out, opts.max_accuracy_drop, say,
                             float(opts.backend_options.get("eval_budget_s", EVAL_BUDGET_S)))
        passing = [c for c in cands if c.status == "passed"]
        if not passing:
            unverified = [c for c in cands if c.status == "unverified"]
            if not (unverified and not tgt.runs_on_host()):
                raise _no_candidate_error(cands, skipped, opts.max_accuracy_drop)
            # Nothing for this target runs here (e.g. an OpenCL GPU): ship the static-order choice, marked
            # unverified; its self-test compares the device's outputs with the FP32 reference.
            say("no candidate runs on this host: choosing by the static order, accuracy unverified")
            passing = unverified
        measured = tgt.runs_on_host() and opts.benchmark
        if measured:
            feeds = {k: v[: (batch or 1)] for k, v in eval_set.inputs.items()}
            say(f"benchmarking {len(passing)} candidate(s) at batch {batch or 1} (~{opts.benchmark_seconds:g} s)")
            timings = run_benchmark({str(c.index): (lambda rt=c.runtime: rt.run(feeds)) for c in passing},
                                    seconds=opts.benchmark_seconds)
            for c in passing:
                c.latency = timings[str(c.index)]
        chosen, selection = select(passing, measured=measured, backend_order=list(tgt.backends),
                                   verified=passing[0].status != "unverified")
        chosen.status = "selected"
        selection["host_runs_target"] = tgt.runs_on_host()
        say(f"selected {chosen.spec.label}: {selection['reason']}")
        manifest, golden = _manifest(opts, tgt, imported, chosen, cands, skipped, selection, eval_set, calib_set,
                                     fp32_out, fp32_score, metric, batch, epoch)
        files: dict[str, Any] = dict(chosen.built.files)
        files[SELFTEST_FILE] = golden
        unsigned = workdir / "unsigned.edgepkg"
        write_artifact(unsigned, dict(manifest), files)
        if cache is not None:
            cache.put(key, unsigned, {"notes": imported.notes, "manifest_name": manifest["name"]})
        manifest = _emit_from_cache(unsigned, opts)
        say(f"wrote {opts.output}")
        return CompileResult(opts.output, manifest, "miss" if cache is not None else "disabled", key,
                             time.perf_counter() - start, imported.notes)
    finally:
        for c in cands:
            if c.runtime is not None:
                try:
                    c.runtime.close()
                except Exception:  # closing is best effort
                    pass
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------ steps


def _precisions(opts: CompileOptions, tgt) -> list[str]:
    allowed = list(tgt.precisions)
    if opts.precision == "auto":
        return allowed
    if opts.precision not in allowed:
        raise UsageError(f"target '{tgt.name}' does not support precision {opts.precision}",
                         hint=f"choose one of {allowed} or --precision auto")
    if opts.precision == "int8" and opts.calib is None:
        raise UsageError("--precision int8 needs calibration data", hint="pass --calib CALIB.npz")
    return [opts.precision]


def _backend_names(opts: CompileOptions, tgt) -> list[str]:
    if opts.backend == "auto":
        return list(tgt.backends)
    if opts.backend not in tgt.backends:
        raise UsageError(f"target '{tgt.name}' is not served by backend {opts.backend}",
                         hint=f"choose one of {list(tgt.backends)} or --backend auto")
    return [opts.backend]


def _sha(path: Path | None) -> str | None:
    return ev.file_sha256(path) if path is not None else None


def _target_file_sha(name: str) -> str:
    from edgeml.targets import TARGET_DIR

    path = TARGET_DIR / f"{name}.toml"
    return ev.file_sha256(path) if path.is_file() else name


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
        from edgeml.errors import DataError

        raise DataError(f"the model has a fixed batch of {batch}; the eval data has only {eval_set.n} samples")
    return calib, eval_set


def _reference_outputs(imported: ImportedModel, eval_set: ev.Dataset, batch: int | None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from edgeml.compiler.backends.onnxruntime import ort_error

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(imported.onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ort_error(exc, "run the FP32 reference model") from exc
    names = [s.name for s in imported.outputs]

    def run(feeds):
        try:
            return dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:
            raise ort_error(exc, "run the FP32 reference model on the eval data") from exc

    return ev.run_batched(run, eval_set.inputs, batch)


def _collect_candidates(backends: list[str], precisions: list[str], ctx: BuildContext, cands: list[Candidate],
                        opts: CompileOptions, have_calib: bool) -> list[dict[str, Any]]:
    skipped: list[dict[str, Any]] = []
    wanted = list(precisions)
    if "int8" in wanted and not have_calib:
        wanted.remove("int8")
        skipped.append({"label": "*/int8", "backend": None, "precision": "int8", "status": "skipped",
                        "selected": False, "reason": "no calibration data (pass --calib to try int8)"})
    for name in backends:
        try:
            impl = COMPILER_BACKENDS.get(name)()
        except (ImportError, AttributeError, RegistryError) as exc:
            skipped.append(_skip(name, f"backend module unavailable: {exc}"))
            continue
        why = impl.unavailable_reason()
        if why:
            if opts.backend == name:
                raise MissingDependency(f"backend {name} is unavailable: {why}", hint="pip install 'edgeml[compiler]'")
            skipped.append(_skip(name, why))
            continue
        try:
            specs = impl.candidates(ctx, wanted)
            version = impl.version()
        except EdgemlError:
            raise
        except Exception as exc:  # a broken optional backend must not stop the others
            skipped.append(_skip(name, f"{type(exc).__name__}: {exc}"))
            continue
        if not specs:
            skipped.append(_skip(name, f"offers no candidate for target {ctx.target.name} among {wanted}"))
        for spec in specs:
            if not spec.label:
                spec = CandidateSpec(spec.backend, spec.precision, spec.recipe, f"{spec.backend}/{spec.precision}")
            cands.append(Candidate(len(cands), spec, backend_version=version))
    return skipped


def _skip(backend: str, reason: str) -> dict[str, Any]:
    return {"label": f"{backend}/*", "backend": backend, "precision": None, "status": "skipped",
            "selected": False, "reason": reason}


def _provisional_manifest(tgt, imported: ImportedModel, backend: dict[str, Any], precision: str) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "name": "candidate", "version": "0.0.0", "target": tgt.name,
            "required_features": list(tgt.required_features), "arch": tgt.arch, "backend": backend,
            "precision": precision, "inputs": [s.to_dict() for s in imported.inputs],
            "outputs": [s.to_dict() for s in imported.outputs], "files": {}}


def _build_and_check(c: Candidate, ctx: BuildContext, workdir: Path, imported: ImportedModel, threads, eval_set,
                     batch, fp32_out, fp32_score, metric, names_out, tolerance: float, say,
                     eval_budget_s: float | None = None) -> None:
    impl = COMPILER_BACKENDS.get(c.spec.backend)()
    say(f"building {c.spec.label}")
    try:
        c.built = impl.build(c.spec, ctx)
    except CandidateSkipped as exc:
        c.status, c.reason = "skipped", str(exc)
        say(f"  {c.spec.label}: skipped ({exc})")
        return
    except EdgemlError as exc:
        c.status, c.reason, c.error = "failed", f"build failed: {exc.message}", exc
        return
    except Exception as exc:  # backend libraries raise their own types
        c.status, c.reason = "failed", f"build failed: {type(exc).__name__}: {str(exc)[:400]}"
        return
    folder = workdir / "candidates" / str(c.index)
    for member, src in c.built.files.items():
        dest = folder / member
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)
    backend = {"name": c.spec.backend, "version": c.backend_version, "entrypoint": c.built.entrypoint,
               "options": c.built.backend_options}
    manifest = _provisional_manifest(ctx.target, imported, backend, c.spec.precision)
    (folder / "manifest.json").write_bytes(canonical_json(manifest))
    try:
        c.runtime = open_backend(c.spec.backend, folder, manifest, threads=threads)
        out = ev.run_batched(c.runtime.run, eval_set.inputs, batch, budget_s=eval_budget_s)
    except Exception as exc:  # EdgemlError or a backend's own
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {str(exc)[:300]}"
        if not ctx.target.runs_on_host():
            c.status, c.reason = "unverified", f"cannot run on this host to measure accuracy: {message}"
        else:
            c.status, c.reason = "failed", f"runtime check failed: {message}"
            c.error = exc if isinstance(exc, EdgemlError) else None
        if c.runtime is not None:
            c.runtime.close()
            c.runtime = None
        return
    c.score = ev.score(metric, out, fp32_out, eval_set, names_out)
    done = len(out[names_out[0]])
    if done < eval_set.n:  # too slow for the whole eval split: compare with FP32 on the same samples
        c.eval_samples = done
        c.built.notes.append(f"evaluated on the first {done} of {eval_set.n} eval samples "
                             f"(eval budget {eval_budget_s:g} s; option eval_budget_s)")
        fp32_score = ev.score(metric, {k: v[:done] for k, v in fp32_out.items()}, fp32_out, eval_set, names_out)
    c.drop = fp32_score.value - c.score.value
    if c.drop > tolerance + 1e-9:
        c.status = "rejected"
        c.reason = f"{metric} drops {c.drop:.2f} points (> {tolerance:g} allowed)"
        c.runtime.close()
        c.runtime = None
    else:
        c.status = "passed"
    say(f"  {c.spec.label}: {metric} {c.score.value:.2f} (FP32 {fp32_score.value:.2f}) -> {c.status}")


def _no_candidate_error(cands: list[Candidate], skipped: list[dict[str, Any]], tolerance: float) -> EdgemlError:
    lines = [f"{c.spec.label}: {c.status}: {c.reason}" for c in cands] + \
            [f"{s['label']}: skipped: {s['reason']}" for s in skipped]
    detail = "; ".join(lines) or "no backend offered a candidate"
    unsupported = [c.error for c in cands if isinstance(c.error, UnsupportedOp)]
    if cands and len(unsupported) == len(cands):
        first = unsupported[0]
        return UnsupportedOp(first.message + (f" (all candidates failed: {detail})" if len(cands) > 1 else ""),
                             hint=first.hint)
    if any(c.status == "rejected" for c in cands):
        return AccuracyError(f"no candidate kept accuracy within {tolerance:g} points: {detail}",
                             hint="raise --max-accuracy-drop, give more --calib data, or use --precision fp32")
    if any(c.status == "unverified" for c in cands):
        return CompileError(f"no candidate could be verified on this host: {detail}")
    return CompileError(f"no candidate could be built: {detail}")


def _manifest(opts: CompileOptions, tgt, imported: ImportedModel, chosen: Candidate, cands: list[Candidate],
              skipped: list[dict[str, Any]], selection: dict[str, Any], eval_set: ev.Dataset,
              calib_set: ev.Dataset | None, fp32_out, fp32_score: ev.Score, metric: str, batch: int | None,
              epoch: int | None) -> tuple[dict[str, Any], bytes]:
    reproducible = epoch is not None
    k = batch or min(GOLDEN_SAMPLES, eval_set.n)
    golden_in = {n: np.ascontiguousarray(a[:k]) for n, a in eval_set.inputs.items()}
    verified = chosen.runtime is not None
    if verified:
        golden_out = chosen.runtime.run(golden_in)
    else:
        golden_out = {n: np.ascontiguousarray(a[:k]) for n, a in fp32_out.items()}
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
        "inputs": [s.to_dict() for s in imported.inputs],
        "outputs": [s.to_dict() for s in imported.outputs],
        "candidates": [c.to_dict(reproducible) for c in cands] + skipped,
        "selection": selection,
        "accuracy": {"metric": metric, "fp32": round(fp32_score.value, 4), "verified": verified,
                     "compiled": round(chosen.score.value, 4) if verified else None,
                     "drop": round(chosen.drop, 4) if verified else None, "max_drop": opts.max_accuracy_drop,
                     "data": eval_set.source, "samples": eval_set.n,
                     "max_abs_error": float(f"{chosen.score.max_abs_error:.4g}") if verified else None},
        "provenance": {
            "source_model": imported.source,
            "calibration": calib_set.describe() if calib_set else None,
            "eval": eval_set.describe(),
            "tools": tool_versions(),
            "options": opts.key_dict(),
            "created": created_timestamp(epoch),
            "reproducible": reproducible,
            "host": host_info(),
            "import_notes": imported.notes,
        },
        "runtime": {"threads": tgt.default_threads or None},
        "selftest": {"file": SELFTEST_FILE, "samples": k, "rtol": rtol, "atol": atol,
                     "reference": "compiled" if verified else "fp32",
                     "latency_budget_ms": None if reproducible else latency_budget_ms(p90)},
        "drift_profile": ev.drift_profile(fp32_out, eval_set.inputs),
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
