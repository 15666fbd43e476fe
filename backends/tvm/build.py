"""TVM compiler backend: ONNX -> Relax -> target pipeline -> shared library + params.

Flow (one candidate, FP32):

1. fix the input shapes in a copy of the ONNX model (known dims static, dynamic
   dims named; a tuned build fixes every dynamic dim to ``tune_batch``, default 1),
2. ``relax.frontend.onnx.from_onnx(keep_params_in_input=True)``, ``detach_params``,
3. untuned: ``LiftTransformParams`` only (the target's default pipeline runs in
   ``tvm.compile``; CUDA/OpenCL get DLight default GPU schedules there).
   tuned (CPU targets this host executes): ``edgeml.backends.tvm.tuning`` runs
   MetaSchedule within the time budget, records go to a database reused later,
4. the weight-only computations (``main_transform_params``) are compiled for this
   host and run here once, so the device receives ready-to-use parameters,
5. ``tvm.compile(main, target, host)`` and ``export_library`` with the target's
   cross compiler (``tvm.support.cc.cross_compiler``) when the target arch is not
   this host's.

Artifact members: ``model/model.so`` (entrypoint) and ``model/params.bin``
(``tvm.runtime.save_param_dict``). ``edgeml.backends.tvm.run`` loads them
with ``tvm.runtime.load_module`` + ``relax.VirtualMachine``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any

from edgeml.backends.base import BuildContext, BuiltCandidate, CandidateSpec, CompilerBackend
from edgeml.backends.tvm import Options, parse_budget  # noqa: F401 - parse_budget: re-exported
from edgeml.backends.tvm.errors import IMPORT_TABLE
from edgeml.errors import CompileError, MissingDependency, ModelError

# Measured on this project's 2-core x86 box (issue 5): untuned TVM is ~80x slower
# than ONNX Runtime on CNNs; a MetaSchedule trial costs a few seconds.
SECONDS_PER_TRIAL_ESTIMATE = 2.0
TRIALS_PER_TASK_SUGGESTED = 16
PARAMS_MEMBER = "model/params.bin"
LIBRARY_MEMBER = "model/model.so"


def _options(ctx: BuildContext) -> Options:
    """This backend's typed options (a plain dict is checked against the schema; None: defaults)."""
    from edgeml.backends.tvm import BACKEND

    if isinstance(ctx.options, Options):
        return ctx.options
    parsed: Options = BACKEND.parse_options(ctx.options or {}, strict=True)
    return parsed


def require_tvm():
    """Import the full TVM compiler, or raise MissingDependency / CompileError."""
    import sys

    try:
        import tvm
    except ImportError as exc:
        raise MissingDependency(
            f"the TVM backend needs apache-tvm, which is not installed ({exc})", hint="pip install 'edgeml[compiler]'"
        ) from exc
    if getattr(tvm.base, "_RUNTIME_ONLY", False) or "tvm.relax" not in sys.modules:
        raise CompileError(
            "TVM was imported in runtime-only mode in this process (a TVM artifact was loaded first), "
            "so it cannot compile",
            hint="compile in a fresh process, or set EDGEML_TVM_RUNTIME_ONLY=0 before loading TVM artifacts",
        )
    return tvm


def tvm_target(target_cfg: dict[str, Any]):
    """``tvm.target.Target`` from a target file's ``[tvm]`` table."""
    import tvm

    if not target_cfg.get("target"):
        raise CompileError("this target has no [tvm] table; TVM cannot build for it")
    try:
        host = target_cfg.get("host")
        return tvm.target.Target(dict(target_cfg["target"]), host=dict(host) if host else None)
    except Exception as exc:  # tvm raises its own error types
        raise CompileError(f"TVM rejects the target description {target_cfg}: {exc}") from exc


def device_kind(target_cfg: dict[str, Any]) -> str:
    kind = target_cfg.get("target", {}).get("kind", "llvm")
    return "cpu" if kind in ("llvm", "c") else kind


def prepare_onnx(onnx_path: Path, inputs: list[Any], static_batch: int | None):
    """Load the ONNX model and write each input's shape into it.

    Known dims become static; dynamic dims keep (or get) a name, or become
    ``static_batch`` when given (tuning needs static shapes). Returns
    (model, input names in graph order, shapes used).
    """
    import onnx

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model {onnx_path}: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    specs = {s.name: s for s in inputs}
    names, shapes = [], {}
    for gi in graph_inputs:
        names.append(gi.name)
        spec = specs.get(gi.name)
        dims = gi.type.tensor_type.shape.dim
        if spec is not None:
            if len(spec.shape) != len(dims) and len(dims):
                raise ModelError(f"input '{gi.name}': shape {list(spec.shape)} does not match the model's rank {len(dims)}")
            wanted = list(spec.shape)
        else:
            wanted = [d.dim_value if d.dim_value > 0 else None for d in dims]
        if not len(dims):
            for _ in wanted:
                gi.type.tensor_type.shape.dim.add()
            dims = gi.type.tensor_type.shape.dim
        used: list[int | None] = []
        for axis, (dim, want) in enumerate(zip(dims, wanted)):
            if want is not None:
                dim.Clear()
                dim.dim_value = int(want)
                used.append(int(want))
            elif static_batch is not None:
                dim.Clear()
                dim.dim_value = int(static_batch)
                used.append(int(static_batch))
            else:
                param = dim.dim_param or ("batch" if axis == 0 else f"{gi.name}_d{axis}")
                dim.Clear()
                dim.dim_param = param
                used.append(None)
        shapes[gi.name] = used
    return model, names, shapes


def import_relax(model, opset: int | None = None):
    """ONNX -> Relax IRModule with parameters as function inputs; returns (mod, params)."""
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, keep_params_in_input=True, opset=opset)
    except Exception as exc:  # OpNotImplemented -> UnsupportedOp, anything else -> ModelError
        raise IMPORT_TABLE.map(exc, "import the ONNX model") from exc
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod, params = detach_params(mod)
    return mod, list(params.get("main", []))


def _refuse_dynamic_inner_dims(inputs: list[Any]) -> None:
    """TVM plans memory for one shape: a dynamic sequence axis (a text encoder's tokens) cannot be built."""
    from edgeml.backends.base import CandidateSkipped

    for spec in inputs:
        if any(d is None for d in list(spec.shape)[1:]):
            fixed = ",".join("1" if i == 0 else ("128" if d is None else str(d)) for i, d in enumerate(spec.shape))
            raise CandidateSkipped(
                f"TVM needs static shapes; input {spec.name!r} has a dynamic non-batch axis "
                f"({['?' if d is None else d for d in spec.shape]}). To build TVM for one sequence length, "
                f"compile with --input-shape {spec.name}={fixed} (and the same for the other inputs)")


def import_relax_folding_shapes(model, shapes: dict[str, list[int | None]], workdir: Path, notes: list[str]):
    """``import_relax``; when it fails on a fully static model, fold its shape arithmetic first and retry.

    Transformer exports compute reshape targets from ``Shape`` -> ``Gather`` chains, which TVM's Relax
    importer cannot follow (``Gather`` over ``shape_of``). With every input shape known, ONNX Runtime's
    basic (constant-folding, provider-independent) optimization turns those chains into constants.
    """
    try:
        return import_relax(model)
    except ModelError as first:
        if any(d is None for dims in shapes.values() for d in dims):
            raise
        folded = _fold_constants(model, workdir)
        try:
            result = import_relax(folded)
        except ModelError:
            raise first from None
        notes.append(f"TVM's importer failed on the exported graph ({first.message[:160]}); imported after "
                     "folding its shape arithmetic with ONNX Runtime's basic optimizations")
        return result


def _fold_constants(model, workdir: Path):
    import onnx
    import onnxruntime as ort

    src, dst = workdir / "tvm-static.onnx", workdir / "tvm-folded.onnx"
    src.write_bytes(model.SerializeToString())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"cannot fold the model's shape arithmetic for TVM: {str(exc)[:300]}") from exc
    return onnx.load(str(dst))


def lift_and_split(mod, params: list, host_target) -> tuple[Any, list]:
    """Run the weight-only part of the model here; return (device module, device params)."""
    import tvm
    from tvm import relax

    mod = relax.transform.LiftTransformParams()(mod)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if "main_transform_params" not in names:
        return mod, params
    transform_mod = relax.transform.DeadCodeElimination(["main_transform_params"])(mod)
    transform_mod = _only(transform_mod, "main_transform_params")
    device_mod = relax.transform.DeadCodeElimination(["main"])(_only(mod, "main"))
    ex = tvm.compile(transform_mod, target=host_target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main_transform_params"](list(params))
    return device_mod, [out[i] for i in range(len(out))]


def _only(mod, keep: str):
    """Drop the other Relax functions (TIR functions stay; DCE removes unused ones)."""
    import tvm
    from tvm import relax

    functions = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and gv.name_hint != keep:
            continue
        functions[gv] = func
    new = tvm.IRModule(functions, attrs=mod.attrs)
    return relax.transform.DeadCodeElimination([keep])(new)


def host_llvm_target():
    import tvm

    return tvm.target.Target({"kind": "llvm"})


def export(executable, path: Path, target, cross_compiler: str | None) -> None:
    """``export_library`` with the cross compiler when the target is another arch."""
    fcompile = None
    if not cross_compiler:
        from tvm.support import cc as tvm_cc

        if tvm_cc.get_cc() is None:  # TVM links every compiled model with the host's C/C++ compiler
            raise MissingDependency("TVM needs a C/C++ compiler to link the model; none is installed (g++, gcc, clang)",
                                    hint="apt-get install g++ (or choose --backend onnxruntime / openvino)")
    if cross_compiler:
        if shutil.which(cross_compiler) is None:
            raise MissingDependency(
                f"cross compiler '{cross_compiler}' is not installed",
                hint="apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
            )
        from tvm.support import cc

        fcompile = cc.cross_compiler(cross_compiler)
    try:
        if fcompile is None:
            executable.export_library(str(path))
        else:
            executable.export_library(str(path), fcompile=fcompile)
    except Exception as exc:
        text = str(exc)
        if "crti.o" in text or "cannot find -lc" in text:
            raise MissingDependency(
                f"{cross_compiler} cannot link: the target's C library is missing ({text.splitlines()[0][:200]})",
                hint="apt-get install libc6-dev-arm64-cross",
            ) from exc
        raise CompileError(f"TVM could not export the shared library: {text[:2000]}") from exc


def library_arch(path: Path) -> str | None:
    """Machine of an ELF shared library (x86_64 / aarch64), read from its header."""
    data = Path(path).read_bytes()[:20]
    if data[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(data[18:20], "little")
    return {62: "x86_64", 183: "aarch64"}.get(machine, f"elf-machine-{machine}")


class TvmCompiler(CompilerBackend):
    name = "tvm"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tvm") is None:
            return "apache-tvm is not installed (pip install 'edgeml[compiler]')"
        if importlib.util.find_spec("onnx") is None:
            return "onnx is not installed (pip install 'edgeml[compiler]')"
        return None

    def version(self) -> str:
        try:
            return importlib.metadata.version("apache-tvm")
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    # -- candidates -----------------------------------------------------
    def candidates(self, ctx: BuildContext, precisions: list[str]) -> list[CandidateSpec]:
        target = ctx.target
        if "tvm" not in target.backends or not target.tvm.get("target"):
            return []
        if "fp32" not in precisions:
            return []
        budget = float(_options(ctx).tune_budget)
        tunable = self.tunable(ctx)
        tuned = budget > 0 and tunable is None
        recipe = {
            "tuned": tuned,
            "tune_budget_s": budget if tuned else 0.0,
            "tvm_target": target.tvm.get("target"),
            "tvm_host": target.tvm.get("host"),
        }
        if budget > 0 and tunable is not None:
            recipe["untuned_reason"] = tunable
        label = f"tvm/fp32/{'tuned' if tuned else 'untuned'}"
        return [CandidateSpec("tvm", "fp32", recipe=recipe, label=label)]

    @staticmethod
    def tunable(ctx: BuildContext) -> str | None:
        """None when MetaSchedule can measure this target here; else why not."""
        target = ctx.target
        if device_kind(target.tvm) != "cpu":
            return f"tuning a {device_kind(target.tvm)} target needs that GPU attached to this machine"
        if not target.runs_on_host():
            return f"tuning measures on the device; this host cannot run target '{target.name}'"
        return None

    # -- build ----------------------------------------------------------
    def build(self, spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
        start = time.perf_counter()
        tvm = require_tvm()
        target_cfg = ctx.target.tvm
        target = tvm_target(target_cfg)
        out_dir = Path(ctx.workdir) / f"tvm-{spec.precision}-{'tuned' if spec.recipe.get('tuned') else 'untuned'}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        tuned = bool(spec.recipe.get("tuned"))
        static_batch = _options(ctx).tune_batch if tuned else None
        _refuse_dynamic_inner_dims(ctx.inputs)
        ctx.progress(f"tvm: importing {Path(ctx.onnx_path).name} into Relax")
        model, input_names, shapes = prepare_onnx(Path(ctx.onnx_path), ctx.inputs, static_batch)
        notes: list[str] = []
        mod, params = import_relax_folding_shapes(model, shapes, out_dir, notes)
        recipe: dict[str, Any] = {"backend": "tvm", "tvm_target": str(target)}
        tuning_report = None
        if tuned:
            from edgeml.backends.tvm import tuning as tvm_tuning

            target = tvm_tuning.with_host_cores(target)
            budget = float(spec.recipe.get("tune_budget_s") or float(_options(ctx).tune_budget))
            mod, params, tuning_report = tvm_tuning.tune_and_apply(
                mod, params, target,
                budget_s=budget,
                database_dir=tvm_tuning.database_dir(target, _options(ctx).tuning_db),
                progress=ctx.progress,
                trials_per_task=_options(ctx).tune_trials_per_task or None,
            )
            recipe.update(tuning_report.to_dict())
            notes.append(tuning_report.summary())
        ctx.progress("tvm: precomputing weight transforms on this host")
        try:
            device_mod, device_params = lift_and_split(mod, params, host_llvm_target())
        except Exception as exc:
            raise CompileError(f"TVM failed while preparing parameters: {type(exc).__name__}: {exc}") from exc
        ctx.progress(f"tvm: compiling for {target.kind.name} ({ctx.target.name})")
        try:
            executable = tvm.compile(device_mod, target=target)
        except Exception as exc:
            raise CompileError(f"TVM failed to compile for target '{ctx.target.name}': {type(exc).__name__}: {str(exc)[:2000]}") from exc
        from edgeml.targets import host_arch

        cross = ctx.target.cross_compiler if ctx.target.arch != host_arch() else None
        library = out_dir / "model.so"
        export(executable, library, target, cross)
        params_path = out_dir / "params.bin"
        tvm.runtime.save_param_dict_to_file({f"p{i:04d}": p for i, p in enumerate(device_params)}, str(params_path))
        arch = library_arch(library)
        if not tuned:
            recipe["tuned"] = False
            recipe["trials"] = 0
            reason = spec.recipe.get("untuned_reason")
            n_tasks = self.count_tasks(device_mod)
            cost = n_tasks * TRIALS_PER_TASK_SUGGESTED * SECONDS_PER_TRIAL_ESTIMATE
            recipe["tuning_estimate"] = {
                "tasks": n_tasks,
                "trials_per_task": TRIALS_PER_TASK_SUGGESTED,
                "seconds": round(cost),
                "how": "edgeml compile --backend tvm --tune-budget 10m on a machine that runs the target",
            }
            if device_kind(target_cfg) == "cpu" and ctx.target.arch == "x86_64":
                schedule = "no schedules (plain loops); expect it to be far slower than ONNX Runtime"
            elif device_kind(target_cfg) == "cpu":
                schedule = "no schedules (plain loops)"
            else:
                schedule = "DLight default GPU schedules"
            notes.append(
                f"untuned TVM build: {schedule}"
                + (f"; not tuned because {reason}" if reason else "")
                + f"; tuning would take about {round(cost / 60)} min ({n_tasks} tasks x {TRIALS_PER_TASK_SUGGESTED} trials)"
            )
        backend_options = {
            "device": device_kind(target_cfg),
            "function": "main",
            "inputs": input_names,
            "input_shapes": shapes,
            "params": PARAMS_MEMBER,
            "num_params": len(device_params),
            "static_batch": static_batch,
            "tuned": tuned,
            "library_arch": arch,
        }
        if backend_options["device"] == "cuda":
            notes.append("CUDA kernels ship as source; the device compiles them at load with NVRTC (cuda-python) or nvcc")
        return BuiltCandidate(
            spec=spec,
            files={LIBRARY_MEMBER: library, PARAMS_MEMBER: params_path},
            entrypoint=LIBRARY_MEMBER,
            backend_options=backend_options,
            recipe=recipe,
            notes=notes,
            build_seconds=time.perf_counter() - start,
        )

    @staticmethod
    def count_tasks(mod) -> int:
        """Distinct TIR kernels in the module before lowering (an estimate of tuning tasks)."""
        from tvm import relax, tirx

        try:
            lowered = relax.transform.LegalizeOps()(mod)
            lowered = relax.transform.AnnotateTIROpPattern()(lowered)
            lowered = relax.transform.FuseOps()(lowered)
            lowered = relax.transform.FuseTIR()(lowered)
            return sum(1 for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
        except Exception:  # an estimate only
            return 0
