"""OpenVINO compiler backend: IR files (``model.xml`` + ``model.bin``).

Candidates:

* ``fp32``: ``openvino.convert_model`` of the imported ONNX, saved with
  ``compress_to_fp16=False``. The artifact pins ``inference_precision=f32``:
  OpenVINO's CPU plugin otherwise defaults to bf16 on CPUs that have it (AVX-512
  BF16 / AMX), which would silently not be FP32.
* ``fp16``: the same IR with FP16 weights (``compress_to_fp16=True``); offered when
  the pipeline asks for fp16 (the target lists it). On GPU it computes in f16; on CPU
  the weights are decompressed at load and computed in f32 (half-size files).
* ``bf16`` (targets listing it: x86 with AVX512-BF16 / AMX): the fp32 IR run with
  ``inference_precision=bf16`` (what OpenVINO's CPU plugin does by default on such CPUs; edgeml pins it
  per candidate so FP32 stays FP32 and BF16 is measured like every candidate). On an ARM target with
  FP16 arithmetic, ``fp16`` runs with ``inference_precision=f16``.
* ``int8``: post-training quantization with ``nncf.quantize`` over the calibration
  data (preset, subset size, bias correction, overflow fix and ignored scope go into
  the recipe). On x86 targets with the no-VNNI saturation hazard the recipe uses
  NNCF's ``OverflowFix.ENABLE`` (7-bit weights everywhere) instead of the default
  first-layer-only fix.
* ``int8`` with accuracy control: when ``max_accuracy_drop`` and eval data are given
  (``ctx.reference``: the pipeline's eval data, metric and tolerance),
  ``nncf.quantize_with_accuracy_control`` reverts the most sensitive layers to
  float until the metric (the pipeline's metric: top-1, or agreement with FP32)
  is within the tolerance. In the pipeline it is skipped ("not needed") when the
  plain NNCF candidate already meets the tolerance.

Options (``edgeml.backends.openvino.Options``; ``edgeml.compile(..., ov_subset_size=64)``):
``ov_subset_size`` (default 300), ``ov_fast_bias_correction`` (default True),
``ov_preset`` ("performance" | "mixed"), ``ov_ignored_scope`` ({"names": [...],
"types": [...], "patterns": [...]}), ``ov_accuracy_control`` (default True),
``ov_ac_max_iterations`` (layers groups accuracy control may revert, default 8).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.backends.base import BuildContext, BuiltCandidate, CandidateSpec, CompilerBackend
from edgeml.backends.base import CandidateSkipped
from edgeml.backends.openvino import Options
from edgeml.backends.openvino.errors import CONVERT_TABLE
from edgeml.errors import CompileError, DataError, MissingDependency
from edgeml.runtime.model import fixed_batch

ENTRY = "model/model.xml"
WEIGHTS = "model/model.bin"
DEFAULT_SUBSET = 300
VALIDATION_LIMIT = 1000          # eval samples used inside accuracy control
PLAIN_INT8 = "openvino/int8/nncf"


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependency("the OpenVINO backend needs openvino", hint="pip install 'edgeml[compiler]'") from exc
    return openvino


def _nncf():
    try:
        import nncf
    except ImportError as exc:
        raise MissingDependency("OpenVINO int8 needs nncf", hint="pip install 'edgeml[compiler]'") from exc
    import logging

    nncf.set_log_level(logging.ERROR)
    return nncf


def _options(ctx: BuildContext) -> Options:
    """This backend's typed options (a plain dict is checked against the schema; None: defaults)."""
    from edgeml.backends.openvino import BACKEND

    if isinstance(ctx.options, Options):
        return ctx.options
    parsed: Options = BACKEND.parse_options(ctx.options or {}, strict=True)
    return parsed


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def ov_device(target) -> str:
    return "GPU" if getattr(target, "device", "cpu") == "gpu" else "CPU"


def saturation_hazard(target) -> bool:
    """x86 CPU targets that do not require VNNI may run u8s8 kernels that saturate."""
    if getattr(target, "int8_saturation_hazard", False):
        return True
    feats = set(getattr(target, "required_features", ()))
    return (target.arch == "x86_64" and ov_device(target) == "CPU"
            and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & feats))


class OpenVinoCompiler(CompilerBackend):
    name = "openvino"

    def unavailable_reason(self) -> str | None:
        if not _have("openvino"):
            return "openvino is not installed (pip install 'edgeml[compiler]')"
        return None

    def version(self) -> str:
        return _ov().get_version()

    # ------------------------------------------------------------ candidates

    def candidates(self, ctx: BuildContext, precisions: list[str]) -> list[CandidateSpec]:
        target = ctx.target
        if self.name not in getattr(target, "backends", (self.name,)):
            return []
        device = ov_device(target)
        specs: list[CandidateSpec] = []
        if "fp32" in precisions:
            specs.append(CandidateSpec(self.name, "fp32", {"method": "ir", "compress_to_fp16": False,
                                                           "device": device}, "openvino/fp32"))
        if "fp16" in precisions:
            specs.append(CandidateSpec(self.name, "fp16", {"method": "ir", "compress_to_fp16": True,
                                                           "device": device}, "openvino/fp16"))
        if "bf16" in precisions and device == "CPU":   # the target requires avx512_bf16 / amx_bf16
            specs.append(CandidateSpec(self.name, "bf16", {"method": "ir", "compress_to_fp16": False,
                                                           "device": device}, "openvino/bf16"))
        if "int8" in precisions and ctx.calib is not None and _have("nncf"):
            base = self._int8_recipe(ctx)
            specs.append(CandidateSpec(self.name, "int8", base, PLAIN_INT8))
            ref = ctx.reference
            if ref is not None and _options(ctx).ov_accuracy_control:
                drop = ref.max_accuracy_drop
                recipe = {**base, "method": "nncf.quantize_with_accuracy_control",
                          "max_drop_points": float(drop), "drop_type": "absolute",
                          "max_iterations": _options(ctx).ov_ac_max_iterations}
                specs.append(CandidateSpec(self.name, "int8", recipe, "openvino/int8/nncf-accuracy-control"))
        return specs

    def _int8_recipe(self, ctx: BuildContext) -> dict[str, Any]:
        o = _options(ctx)
        hazard = saturation_hazard(ctx.target)
        n_calib = _samples(ctx.calib)
        items = n_calib // (fixed_batch(ctx.inputs) or 1)
        scope = o.ov_ignored_scope or {}
        from edgeml.compiler.importers import is_transformer

        return {
            # NNCF's transformer scheme keeps LayerNorm/Softmax/GELU float and adds SmoothQuant-style care
            "model_type": "transformer" if is_transformer(ctx.onnx_path) else None,
            "method": "nncf.quantize",
            "device": ov_device(ctx.target),
            "target_device": "GPU" if ov_device(ctx.target) == "GPU" else "CPU",
            "preset": o.ov_preset,
            "subset_size": min(o.ov_subset_size, items),
            "calibration_samples": n_calib,
            "fast_bias_correction": o.ov_fast_bias_correction,
            "overflow_fix": "enable" if hazard else "first_layer",
            "saturation_hazard": hazard,
            "ignored_scope": {k: list(scope.get(k, [])) for k in ("names", "types", "patterns")},
            "weights": "int8 symmetric per-channel",
            "activations": "int8 per-tensor",
        }

    # ------------------------------------------------------------ build

    def build(self, spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
        ov = _ov()
        start = time.perf_counter()
        out = ctx.workdir / _slug(spec.label or f"{spec.backend}-{spec.precision}")
        (out / "model").mkdir(parents=True, exist_ok=True)
        xml, binf = out / ENTRY, out / WEIGHTS
        model = convert(ctx.onnx_path)
        recipe = dict(spec.recipe)
        notes: list[str] = []
        device = recipe.get("device", ov_device(ctx.target))
        if spec.precision == "int8":
            if recipe["method"] == "nncf.quantize_with_accuracy_control":
                self._skip_if_plain_passes(recipe, ctx, device)
            ctx.progress(f"{spec.label}: quantizing with NNCF ({recipe['method']})")
            model = self._int8(model, recipe, ctx, notes)
            recipe["fake_quantize_ops"] = _count_ops(model, "FakeQuantize")
            compress = False
        elif spec.precision == "fp16":
            compress = True
        elif spec.precision in ("fp32", "bf16"):
            compress = False   # bf16: the CPU plugin converts the f32 weights at load
        else:
            raise CompileError(f"the OpenVINO backend cannot build precision {spec.precision!r}")
        _normalize(model)
        try:
            ov.save_model(model, str(xml), compress_to_fp16=compress)
        except Exception as exc:
            raise CompileError(f"OpenVINO could not save the IR for {spec.label}: {exc}") from exc
        if device == "GPU" and spec.precision in ("fp16", "int8"):
            precision_hint = "f16"     # the GPU plugin's native float precision
        elif spec.precision == "bf16":
            precision_hint = "bf16"    # AVX512-BF16 / AMX kernels; the target requires the feature
        elif spec.precision == "fp16" and ctx.target.arch == "aarch64":
            precision_hint = "f16"     # ARMv8.2 FP16 arithmetic; the target requires asimdhp
        else:
            # CPU: float layers stay f32 (int8 layers run int8 regardless); never the bf16 default
            precision_hint = "f32"
        recipe.update({"compress_to_fp16": compress, "inference_precision": precision_hint,
                       "openvino": self.version()})
        if spec.precision == "int8":
            recipe["nncf"] = _nncf().__version__
        return BuiltCandidate(
            spec=spec,
            files={ENTRY: xml, WEIGHTS: binf},
            entrypoint=ENTRY,
            backend_options={"device": device, "performance_hint": "LATENCY",
                             "inference_precision": precision_hint},
            recipe=recipe,
            notes=notes,
            build_seconds=time.perf_counter() - start,
        )

    def _skip_if_plain_passes(self, recipe: dict[str, Any], ctx: BuildContext, device: str) -> None:
        """Accuracy control is only worth building when plain NNCF int8 misses the tolerance.

        Uses the pipeline's own evaluation of the plain candidate built just before
        (same calibration and recipe); without the pipeline (no ``ctx.evaluate``) it
        always builds.
        """
        plain = ctx.workdir / _slug(PLAIN_INT8)
        fp32_score = ctx.reference.fp32_score if ctx.reference is not None else None
        if ctx.evaluate is None or fp32_score is None or not (plain / ENTRY).is_file():
            return
        fragment = {"backend": {"name": self.name, "entrypoint": ENTRY, "version": self.version(),
                                "options": {"device": device, "performance_hint": "LATENCY",
                                            "inference_precision": "f16" if device == "GPU" else "f32"}},
                    "precision": "int8"}
        drop = float(fp32_score) - float(ctx.evaluate(plain, fragment))
        if drop <= float(recipe["max_drop_points"]):
            raise CandidateSkipped(f"not needed: {PLAIN_INT8} is within the tolerance (drop {drop:.2f} points)")
        ctx.progress(f"{PLAIN_INT8} drops {drop:.2f} points; running NNCF accuracy control")

    def _int8(self, model, recipe: dict[str, Any], ctx: BuildContext, notes: list[str]):
        nncf = _nncf()
        if ctx.calib is None:
            raise DataError("OpenVINO int8 needs calibration data", hint="pass --calib CALIB.npz")
        names = [p.get_any_name() for p in model.inputs]
        batch = fixed_batch(ctx.inputs)
        batches = _batches(ctx.calib, names, batch)
        if not batches:
            raise DataError(f"the calibration data has {_samples(ctx.calib)} samples; the model's fixed batch "
                            f"is {batch}", hint="give at least one full batch of calibration samples")
        calib = nncf.Dataset(batches)
        scope = recipe.get("ignored_scope") or {}
        ignored = None
        if any(scope.values()):
            ignored = nncf.IgnoredScope(names=scope.get("names", []), types=scope.get("types", []),
                                        patterns=scope.get("patterns", []))
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        advanced = AdvancedQuantizationParameters(
            overflow_fix=OverflowFix.ENABLE if recipe["overflow_fix"] == "enable" else OverflowFix.FIRST_LAYER)
        common = dict(
            preset=nncf.QuantizationPreset.MIXED if recipe["preset"] == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
            target_device=nncf.TargetDevice.GPU if recipe["target_device"] == "GPU" else nncf.TargetDevice.CPU,
            subset_size=max(1, recipe["subset_size"]),
            fast_bias_correction=recipe["fast_bias_correction"],
            ignored_scope=ignored,
            model_type=nncf.ModelType.TRANSFORMER if recipe.get("model_type") == "transformer" else None,
        )
        try:
            if recipe["method"] == "nncf.quantize":
                return nncf.quantize(model, calib, advanced_parameters=advanced, **common)
            validation, validate = self._validation(ctx, model, names, batch, recipe)
            restorer = nncf.AdvancedAccuracyRestorerParameters(max_num_iterations=int(recipe["max_iterations"]))
            quantized = nncf.quantize_with_accuracy_control(
                model, calib, validation, validate, max_drop=float(recipe["max_drop_points"]),
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=restorer, **common)
            notes.append(f"accuracy control kept {_count_ops(quantized, 'FakeQuantize')} FakeQuantize ops")
            return quantized
        except (DataError, CompileError):
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("check the names / types / patterns in ov_ignored_scope against the model's layers"
                    if "gnored" in msg else "try --backend onnxruntime, or exclude layers with "
                                            "backend_options={'ov_ignored_scope': {...}}")
            raise CompileError(f"NNCF could not quantize the model for OpenVINO ({recipe['method']}): {msg}",
                               hint=hint) from exc

    def _validation(self, ctx: BuildContext, model, names: list[str], batch: int | None,
                    recipe: dict[str, Any]) -> tuple[Any, Callable]:
        """(nncf.Dataset, validation_fn) computing the pipeline's metric, in points.

        Items are ``(index, feeds)`` so the validation function can score any subset
        NNCF passes (it ranks layers by per-item metric values).
        """
        nncf = _nncf()
        ov = _ov()
        inputs, labels, refs = _unpack_eval(ctx.reference.eval_data if ctx.reference is not None else None)
        step = batch or 1
        n = min(_samples(inputs), VALIDATION_LIMIT)
        n -= n % step
        if n <= 0:
            raise DataError("the eval data has too few samples for OpenVINO accuracy control")
        inputs = {k: v[:n] for k, v in inputs.items()}
        labels = None if labels is None else np.asarray(labels)[:n]
        refs = {k: v[:n] for k, v in refs.items()}
        items = _batches(inputs, names, batch)
        out_names = [o.get_any_name() for o in model.outputs]
        # FP32 reference outputs from the unquantized model, computed in f32.
        fp32_model = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        fp32 = _run_all(fp32_model, items, out_names)
        from edgeml.compiler import evaluate as ev

        def subset(sample_idx: np.ndarray):
            return ev.Dataset({k: v[sample_idx] for k, v in inputs.items()},
                              None if labels is None else labels[sample_idx],
                              {k: v[sample_idx] for k, v in refs.items()})

        metric = (ctx.reference.metric if ctx.reference is not None else None) or ev.choose_metric(subset(np.arange(n)), fp32, out_names)
        recipe["validation"] = {"metric": metric, "samples": n}

        def validate(compiled, data) -> tuple[float, list[float]]:
            request = compiled.create_infer_request()
            per_item, chunks, index = [], [], []
            for i, feeds in data:
                result = request.infer(feeds)
                outs = {name: np.array(result[j], copy=True) for j, name in enumerate(out_names)}
                idx = np.arange(i * step, (i + 1) * step)
                per_item.append(ev.score(metric, outs, {k: v[idx] for k, v in fp32.items()}, subset(idx),
                                         out_names).value)
                chunks.append(outs)
                index.append(idx)
            if not chunks:
                return 0.0, []
            idx = np.concatenate(index)
            outs = {k: np.concatenate([c[k] for c in chunks]) for k in out_names}
            total = ev.score(metric, outs, {k: v[idx] for k, v in fp32.items()}, subset(idx), out_names).value
            return total, per_item

        return nncf.Dataset(list(enumerate(items)), lambda item: item[1]), validate


# ------------------------------------------------------------------ helpers


def convert(onnx_path: Path):
    """ONNX -> ov.Model, with errors that name the op when OpenVINO lacks one."""
    ov = _ov()
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # a missing conversion rule -> UnsupportedOp naming the op; else ModelError
        raise CONVERT_TABLE.map(exc, f"convert {Path(onnx_path).name}") from exc


def _normalize(model) -> None:
    """Make the saved IR depend only on the model, not on process state or paths.

    OpenVINO names constants it creates with a process-wide counter (``Reshape_2726``)
    and records the source path; rename those by topological position so the same
    model compiled twice gives byte-identical files. Parameters and Results keep their
    names, and tensor names (what the runtime uses) are untouched.
    """
    for i, op in enumerate(model.get_ordered_ops()):
        if op.get_type_name() in ("Parameter", "Result"):
            continue
        name = op.get_friendly_name()
        m = re.fullmatch(r"(.*?)_(\d+)", name)
        if m and not name.startswith("/"):
            op.set_friendly_name(f"{m.group(1)}_{i}")
    try:
        model.set_rt_info("model.onnx", ["conversion_parameters", "input_model"])
    except Exception:  # rt_info layout differs between OpenVINO versions; cosmetic only
        pass


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label)


def _count_ops(model, type_name: str) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == type_name)


def _samples(arrays: dict[str, np.ndarray] | None) -> int:
    if not arrays:
        return 0
    return int(next(iter(arrays.values())).shape[0])


def _batches(arrays: dict[str, np.ndarray], names: list[str], batch: int | None) -> list[dict[str, np.ndarray]]:
    """Items of ``batch`` samples (1 for a dynamic batch), keyed by the model's input names."""
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"data has no array for model input {missing[0]!r} (it has {sorted(arrays)})")
    step = batch or 1
    n = _samples(arrays)
    return [{k: np.ascontiguousarray(arrays[k][i:i + step]) for k in names} for i in range(0, n - n % step, step)]


def _unpack_eval(data: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """Accept edgeml.compiler.evaluate.Dataset or {"inputs": {...}, "labels": ...}."""
    if hasattr(data, "inputs"):
        return dict(data.inputs), getattr(data, "labels", None), dict(getattr(data, "references", {}) or {})
    if isinstance(data, dict) and "inputs" in data:
        return dict(data["inputs"]), data.get("labels"), dict(data.get("references") or {})
    raise DataError("eval_data must be a dataset with inputs (and labels or references)")


def _run_all(compiled, items: list[dict[str, np.ndarray]], out_names: list[str]) -> dict[str, np.ndarray]:
    request = compiled.create_infer_request()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in out_names}
    for item in items:
        result = request.infer(item)
        for i, name in enumerate(out_names):
            parts[name].append(np.array(result[i], copy=True))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
