"""ONNX Runtime compiler backend.

Candidates:

* ``fp32``: the graph optimized offline (``SessionOptions.optimized_model_filepath``)
  at ``ORT_ENABLE_EXTENDED`` for CPU targets (fusions into ops every CPU build of
  ONNX Runtime has; no hardware-specific layout) and ``ORT_ENABLE_BASIC`` for GPU
  targets (provider-independent). The runtime loads it at level ``all`` so the
  device adds its own layout optimizations (NCHWc blocking depends on its ISA).
* ``int8``: static QDQ via ``onnxruntime.quantization.quantize_static`` with a
  calibration reader over ``--calib``. Recipes (``INT8_RECIPES``) cover the
  x86 saturation hazard: without VNNI, u8s8 kernels (``vpmaddubsw``) can saturate
  16-bit sums, so such targets default to 7-bit weights (``reduce_range``) and
  also try u8u8 and excluding the sensitive first conv / last MatMul-Gemm. The
  pipeline measures each recipe's accuracy; nothing is assumed.
* ``fp16`` (GPU targets): ``onnxruntime.transformers.float16`` with FP32 I/O.
* Transformer encoders (a graph with MatMul + Softmax and no Conv; ``compiler.importers.is_transformer``): an extra
  ``fp32/transformer-fusion`` candidate (``onnxruntime.transformers.optimizer.optimize_model``,
  ``model_type="bert"``: Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization fusions),
  and MatMul-only int8 recipes (``TRANSFORMER_INT8_RECIPES``): ``quantize_dynamic`` of the fused graph
  (weights int8 offline, activations quantized per run: QAttention / DynamicQuantizeMatMul) and static
  QDQ on MatMul only (LayerNorm, Softmax and GELU stay float, as they lose the most in int8).

Options: ``edgeml.backends.onnxruntime.Options`` (``edgeml.compile(..., ort_int8_recipes=[...],
ort_calibration="minmax")``).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends.base import BuildContext, BuiltCandidate, CandidateSpec, CompilerBackend
from edgeml.backends.base import CandidateSkipped
from edgeml.backends.onnxruntime import Options
from edgeml.backends.onnxruntime.errors import ort_error
from edgeml.errors import CompileError, UsageError
from edgeml.runtime.model import fixed_batch

ENTRY = "model/model.onnx"

# name -> quantize_static arguments (types as strings, resolved at build time)
INT8_RECIPES: dict[str, dict[str, Any]] = {
    "s8s8-per-channel": {"activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True, "reduce_range": False},
    "u8s8-per-channel": {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True, "reduce_range": False},
    "u8s8-per-channel-reduce-range": {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True, "reduce_range": True},
    "u8u8": {"activation_type": "QUInt8", "weight_type": "QUInt8", "per_channel": False, "reduce_range": False},
}
# Transformer encoders: MatMul-only recipes ("dynamic": quantize_dynamic, no calibration ranges).
MATMUL_ONLY = ["MatMul"]
INT8_RECIPES.update({
    "dynamic-matmul-only": {"dynamic": True, "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                            "reduce_range": False, "op_types": MATMUL_ONLY},
    "dynamic-matmul-only-reduce-range": {"dynamic": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                                         "per_channel": True, "reduce_range": True, "op_types": MATMUL_ONLY},
    "s8s8-matmul-only": {"activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
                         "reduce_range": False, "op_types": MATMUL_ONLY},
    "u8s8-matmul-only-reduce-range": {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                                      "reduce_range": True, "op_types": MATMUL_ONLY},
})
# ONNX Runtime's own defaults, as Olive's OnnxDynamicQuantization / OnnxStaticQuantization passes use them
# (per-tensor, every op type the quantizer knows): always candidates, so `auto` cannot lose to that peer.
INT8_RECIPES.update({
    "dynamic-default": {"dynamic": True, "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": False,
                        "reduce_range": False, "op_types": "all"},
    "s8s8-per-tensor": {"activation_type": "QInt8", "weight_type": "QInt8", "per_channel": False,
                        "reduce_range": False},
    # the same on targets that may lack VNNI: 7-bit weights, so the u8s8 kernels cannot saturate there (a host
    # with VNNI would not see the saturation in its measurement)
    "dynamic-default-reduce-range": {"dynamic": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                                     "per_channel": False, "reduce_range": True, "op_types": "all"},
    "u8s8-per-tensor-reduce-range": {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": False,
                                     "reduce_range": True},
})
PEER_DEFAULT_RECIPES = {False: ["dynamic-default", "s8s8-per-tensor"],
                        True: ["dynamic-default-reduce-range", "u8s8-per-tensor-reduce-range"]}
TRANSFORMER_INT8_RECIPES = {False: ["dynamic-matmul-only", "s8s8-matmul-only"],
                            True: ["dynamic-matmul-only-reduce-range", "u8s8-matmul-only-reduce-range"]}
EXCLUDE_SUFFIX = "-exclude-ends"
AWARE_SUFFIX = "-accuracy-aware"


def int8_saturation_hazard(target) -> bool:
    """x86 targets that do not require VNNI may run the u8s8 kernels that saturate."""
    if getattr(target, "int8_saturation_hazard", False):
        return True
    feats = set(getattr(target, "required_features", ()))
    return target.arch == "x86_64" and target.device == "cpu" and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & feats)


def default_int8_recipes(target, transformer: bool = False) -> list[str]:
    """edgeml's recipes for the target, then ONNX Runtime's defaults (the accuracy check keeps them honest)."""
    hazard = int8_saturation_hazard(target)
    peers = PEER_DEFAULT_RECIPES[hazard]
    if transformer:
        return [*TRANSFORMER_INT8_RECIPES[hazard], peers[0]]
    if hazard:
        return ["u8s8-per-channel-reduce-range", "u8u8", "u8s8-per-channel-reduce-range" + EXCLUDE_SUFFIX, *peers]
    return ["s8s8-per-channel", "u8s8-per-channel", "s8s8-per-channel" + EXCLUDE_SUFFIX, *peers]


def _ort():
    import onnxruntime

    return onnxruntime


def _options(ctx: BuildContext) -> Options:
    """This backend's typed options (a plain dict is checked against the schema; None: defaults)."""
    from edgeml.backends.onnxruntime import BACKEND

    if isinstance(ctx.options, Options):
        return ctx.options
    parsed: Options = BACKEND.parse_options(ctx.options or {}, strict=True)
    return parsed


def _providers(target) -> list[str]:
    if target.device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeCompiler(CompilerBackend):
    name = "onnxruntime"

    def unavailable_reason(self) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"not installed ({exc})"
        return None

    def version(self) -> str:
        return _ort().__version__

    def candidates(self, ctx: BuildContext, precisions: list[str]) -> list[CandidateSpec]:
        target = ctx.target
        specs: list[CandidateSpec] = []
        from edgeml.compiler.importers import is_transformer

        transformer = is_transformer(ctx.onnx_path)
        if "fp32" in precisions:
            level = "basic" if target.device != "cpu" else "extended"
            specs.append(CandidateSpec(self.name, "fp32", {"offline_optimization": level}, "onnxruntime/fp32"))
            if transformer and target.device == "cpu":
                specs.append(CandidateSpec(self.name, "fp32", {"offline_optimization": "transformer-fusion",
                                                               "model_type": "bert"},
                                           "onnxruntime/fp32/transformer-fusion"))
        if "fp16" in precisions and target.device in ("cuda", "gpu"):
            specs.append(CandidateSpec(self.name, "fp16", {"conversion": "float16", "keep_io_types": True},
                                       "onnxruntime/fp16"))
        if "int8" in precisions and target.device == "cpu":
            opts = _options(ctx)
            names = list(opts.ort_int8_recipes or [])
            if not names:
                names = default_int8_recipes(target, transformer)
                # Fallback when every plain recipe loses too much: keep the most sensitive nodes in FP32.
                static = [n for n in names if not INT8_RECIPES.get(n, {}).get("dynamic")]
                if opts.ort_accuracy_aware and ctx.reference is not None and static:
                    names = [*names, static[0] + AWARE_SUFFIX]
            calibration = opts.ort_calibration
            for name in names:
                aware = name.endswith(AWARE_SUFFIX)
                base = name[: -len(AWARE_SUFFIX)] if aware else name
                base = base[: -len(EXCLUDE_SUFFIX)] if base.endswith(EXCLUDE_SUFFIX) else base
                if base not in INT8_RECIPES or (base != name and INT8_RECIPES[base].get("dynamic")):
                    raise UsageError(f"unknown ONNX Runtime int8 recipe {name!r}",
                                       hint=f"choose among {sorted(INT8_RECIPES)} (optionally with "
                                            f"'{EXCLUDE_SUFFIX}' or '{AWARE_SUFFIX}')")
                method = "dynamic" if INT8_RECIPES[base].get("dynamic") else "static-qdq"
                recipe = {"method": method, "name": name, "base": base, **INT8_RECIPES[base],
                          "exclude_sensitive": name.endswith(EXCLUDE_SUFFIX), "accuracy_aware": aware,
                          "calibration": calibration,
                          "saturation_hazard": int8_saturation_hazard(target)}
                specs.append(CandidateSpec(self.name, "int8", recipe, f"onnxruntime/int8/{name}"))
        return specs

    def build(self, spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
        start = time.perf_counter()
        out_dir = ctx.workdir / re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.label or f"{spec.backend}-{spec.precision}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (out_dir / "model").mkdir(parents=True)
        out = out_dir / ENTRY
        notes: list[str] = []
        recipe = dict(spec.recipe)
        if spec.precision == "fp32" and spec.recipe.get("offline_optimization") == "transformer-fusion":
            recipe["fused_operators"] = self._fuse_transformer(ctx, out)
        elif spec.precision == "fp32":
            self._optimize(ctx.onnx_path, out, spec.recipe.get("offline_optimization", "extended"))
        elif spec.precision == "fp16":
            self._fp16(ctx.onnx_path, out)
        elif spec.precision == "int8":
            recipe = self._int8(spec, ctx, out, notes)
        else:
            raise CompileError(f"onnxruntime cannot build precision {spec.precision!r}")
        return BuiltCandidate(
            spec=spec,
            files={ENTRY: out},
            entrypoint=ENTRY,
            backend_options={"graph_optimization_level": "all", "providers": _providers(ctx.target)},
            recipe=recipe,
            notes=notes,
            build_seconds=time.perf_counter() - start,
        )

    # ------------------------------------------------------------ builders

    def _optimize(self, src: Path, out: Path, level: str) -> None:
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }[level]
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ort_error(exc, "optimize the FP32 model") from exc

    def _fuse_transformer(self, ctx: BuildContext, out: Path) -> dict[str, int]:
        """ONNX Runtime's transformer optimizer.

        The Attention fusion needs the head count and hidden size: read from the model's metadata
        (``num_attention_heads`` / ``hidden_size``, as edgeml's encoder export and Hugging Face configs
        name them), else left for the optimizer to detect (it often cannot, and then fuses
        LayerNorm/GELU only).
        """
        import onnx
        from onnxruntime.transformers.optimizer import optimize_model

        meta = {p.key: p.value for p in onnx.load(str(ctx.onnx_path), load_external_data=False).metadata_props}
        heads, hidden = (int(meta[k]) if meta.get(k, "").isdigit() else 0
                         for k in ("num_attention_heads", "hidden_size"))
        try:
            fused = optimize_model(str(ctx.onnx_path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                   opt_level=0, use_gpu=False)
        except Exception as exc:
            raise CompileError(f"ONNX Runtime's transformer optimizer failed: {str(exc)[:300]}") from exc
        stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
        if not stats:
            raise CandidateSkipped("ONNX Runtime's transformer optimizer fused nothing in this graph")
        fused.save_model_to_file(str(out))   # adds the com.microsoft opset import the fused ops need
        out.write_bytes(onnx.load(str(out)).SerializeToString(deterministic=True))
        return stats

    def _fp16(self, src: Path, out: Path) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(src))
        try:
            half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        except Exception as exc:
            raise CompileError(f"FP16 conversion failed: {exc}") from exc
        out.write_bytes(half.SerializeToString(deterministic=True))

    def _int8(self, spec: CandidateSpec, ctx: BuildContext, out: Path, notes: list[str]) -> dict[str, Any]:
        import onnx

        if not ctx.calib:
            raise CompileError("int8 needs calibration data", hint="pass --calib CALIB.npz")
        recipe = dict(spec.recipe)
        if recipe.get("dynamic"):
            return self._dynamic(recipe, ctx, out, notes)
        pre = self._preprocessed(ctx, notes)
        if recipe.get("accuracy_aware"):
            return self._accuracy_aware(recipe, ctx, pre, out, notes)
        exclude: list[str] = []
        if recipe.get("exclude_sensitive"):
            exclude = sensitive_nodes(onnx.load(str(pre)))
            recipe["excluded_nodes"] = exclude
        self._quantize(recipe, ctx, pre, out, exclude)
        self._hazard_note(recipe, notes)
        return recipe

    def _dynamic(self, recipe: dict[str, Any], ctx: BuildContext, out: Path, notes: list[str]) -> dict[str, Any]:
        """quantize_dynamic of the transformer-fused graph (QAttention, DynamicQuantizeMatMul); no ranges."""
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgeml.compiler.importers import is_transformer

        fused = ctx.workdir / "ort-transformer-fused.onnx"
        src = ctx.onnx_path
        recipe["fused_first"] = False
        if is_transformer(ctx.onnx_path):
            try:
                if not fused.exists():
                    self._fuse_transformer(ctx, fused)
                src = fused
                recipe["fused_first"] = True
            except (CompileError, CandidateSkipped) as exc:
                notes.append(f"quantized the unfused graph: {exc}")
        every_type = recipe.get("op_types") == "all"   # the quantizer's own default list
        op_types = None if every_type else list(recipe.get("op_types") or MATMUL_ONLY)
        if op_types is not None and recipe["fused_first"]:
            op_types.append("Attention")
        try:
            quantize_dynamic(str(src), str(out), weight_type=getattr(QuantType, recipe["weight_type"]),
                             per_channel=recipe["per_channel"], reduce_range=recipe["reduce_range"],
                             op_types_to_quantize=op_types)
        except Exception as exc:
            raise ort_error(exc, f"quantize the model to int8 ({recipe['name']})") from exc
        recipe["quantized_op_types"] = sorted(_quantized_types(out)) if every_type else op_types
        out.write_bytes(onnx.load(str(out)).SerializeToString(deterministic=True))
        self._hazard_note(recipe, notes)
        return recipe

    def _preprocessed(self, ctx: BuildContext, notes: list[str]) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = ctx.workdir / "ort-int8-preprocessed.onnx"
        if not pre.exists():
            try:
                quant_pre_process(str(ctx.onnx_path), str(pre), skip_symbolic_shape=True)
            except Exception as exc:  # pre-processing is an optimization; quantize the raw model instead
                notes.append(f"quant_pre_process skipped: {str(exc)[:200]}")
                shutil.copyfile(ctx.onnx_path, pre)
        return pre

    def _quantize(self, recipe: dict[str, Any], ctx: BuildContext, pre: Path, out: Path, exclude: list[str]) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[recipe.get("calibration", "minmax")]
        reader = _Reader(ctx.calib, fixed_batch(ctx.inputs) or 1, _options(ctx).ort_calibration_samples)
        recipe["calibration_samples"] = reader.samples
        if reader.samples == 0:
            raise CompileError(f"int8 calibration needs at least {fixed_batch(ctx.inputs) or 1} samples")
        # Activation ranges do not depend on the recipe: calibrate once per method, reuse for every recipe.
        cache = ctx.workdir / f"ort-calibration-{recipe.get('calibration', 'minmax')}-{reader.samples}.json"
        try:
            quantize_static(
                str(pre), str(out), reader,
                quant_format=QuantFormat.QDQ,
                activation_type=getattr(QuantType, recipe["activation_type"]),
                weight_type=getattr(QuantType, recipe["weight_type"]),
                per_channel=recipe["per_channel"],
                reduce_range=recipe["reduce_range"],
                nodes_to_exclude=exclude or None,
                op_types_to_quantize=recipe.get("op_types"),
                calibrate_method=method,
                calibration_cache_path=str(cache),
                # Ranges are merged chunk by chunk, so memory stays bounded for big models.
                extra_options={"CalibStridedMinMax": reader.stride},
            )
        except Exception as exc:
            raise ort_error(exc, f"quantize the model to int8 ({recipe['name']})") from exc
        # Re-save deterministically so the same inputs give the same bytes.
        q = onnx.load(str(out))
        out.write_bytes(q.SerializeToString(deterministic=True))

    def _hazard_note(self, recipe: dict[str, Any], notes: list[str]) -> None:
        if not recipe.get("saturation_hazard"):
            return
        from edgeml.targets import host_features

        if {"avx512_vnni", "avx_vnni"} & host_features():
            how = ("7-bit weights" if recipe["reduce_range"] else
                   "u8 weights" if recipe["weight_type"] == "QUInt8" else "no mitigation")
            notes.append("accuracy measured with this host's VNNI int8 kernels, which cannot saturate; the target "
                         f"may lack VNNI, so this recipe avoids u8s8 saturation by construction ({how})")

    def _accuracy_aware(self, recipe: dict[str, Any], ctx: BuildContext, pre: Path, out: Path,
                        notes: list[str]) -> dict[str, Any]:
        """Keep the nodes that lose the most signal in FP32 until the metric is within the tolerance.

        Ranking: per-node SQNR loss between FP32 and the plain QDQ model on a few
        calibration samples (edgeml.compiler.sensitivity). Then exclude the worst
        1, 2, 4, ... nodes (up to half of them), measuring each step with the
        pipeline's own evaluation (the runtime backend on the eval split).
        """
        from edgeml.compiler.sensitivity import rank_nodes

        if ctx.evaluate is None or ctx.reference is None or ctx.reference.fp32_score is None:
            raise CandidateSkipped("accuracy-aware int8 needs the pipeline's evaluation (eval data and tolerance)")
        base_fragment = {"backend": {"name": self.name, "entrypoint": ENTRY, "version": self.version(),
                                     "options": {"graph_optimization_level": "all",
                                                 "providers": _providers(ctx.target)}},
                         "precision": "int8"}
        tolerance, fp32_score = ctx.reference.max_accuracy_drop, ctx.reference.fp32_score
        trial_dir = out.parent.parent / "trial"
        trial = trial_dir / ENTRY
        trial.parent.mkdir(parents=True, exist_ok=True)
        self._quantize(recipe, ctx, pre, trial, [])
        drop = float(fp32_score) - ctx.evaluate(trial_dir, base_fragment)
        steps = [{"excluded": 0, "drop": round(drop, 4)}]
        if drop <= tolerance:
            raise CandidateSkipped(f"not needed: {recipe['base']} without exclusions is within the tolerance "
                                   f"(drop {drop:.2f} points)")
        ranking = rank_nodes(pre, trial, ctx.calib, samples=_options(ctx).ort_sensitivity_samples)
        limit = max(1, len(ranking) // 2)   # beyond half the nodes in FP32, int8 cannot pay off
        k = 1
        exclude: list[str] = []
        while True:
            exclude = [r["node"] for r in ranking[:k]]
            self._quantize(recipe, ctx, pre, trial, exclude)
            drop = float(fp32_score) - ctx.evaluate(trial_dir, base_fragment)
            steps.append({"excluded": len(exclude), "drop": round(drop, 4)})
            ctx.progress(f"  {recipe['name']}: {len(exclude)} node(s) kept in FP32 -> drop {drop:.2f} points")
            if drop <= tolerance or k >= limit:
                break
            k = min(2 * k, limit)
        shutil.copyfile(trial, out)
        recipe["excluded_nodes"] = exclude
        recipe["sensitivity"] = {"metric": "sqnr_loss_db", "top": ranking[: max(len(exclude), 5)], "steps": steps}
        notes.append(f"kept the {len(exclude)} most sensitive of {len(ranking)} quantized nodes in FP32")
        self._hazard_note(recipe, notes)
        return recipe


def sensitive_nodes(model) -> list[str]:
    """The first Conv (fed by the input) and the last MatMul/Gemm: the usual accuracy hot spots."""
    nodes = list(model.graph.node)
    first = next((n for n in nodes if n.op_type in ("Conv", "ConvTranspose")), None)
    last = next((n for n in reversed(nodes) if n.op_type in ("MatMul", "Gemm", "FusedMatMul")), None)
    names = []
    for n in (first, last):
        if n is not None:
            if not n.name:
                raise CompileError("cannot exclude unnamed nodes from quantization")
            names.append(n.name)
    return names


def _Reader(arrays: dict[str, np.ndarray], batch: int, limit: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_ReaderBase, CalibrationDataReader):
        pass

    return Reader(arrays, batch, limit)


class _ReaderBase:
    """CalibrationDataReader over arrays (first axis = samples), batch by batch.

    Implements ``__len__`` and ``set_range`` so ONNX Runtime can calibrate in
    strides (``CalibStridedMinMax``): at most ``STRIDE`` batches of activations
    are held in memory at once. (ORT's ``CalibMaxIntermediateOutputs`` drops the
    data it has collected when it reaches the limit, so it is not used.)
    """

    STRIDE = 32

    def __init__(self, arrays: dict[str, np.ndarray], batch: int, limit: int):
        feeds = min(len(next(iter(arrays.values()))), limit) // batch
        self.stride = max(1, min(self.STRIDE, feeds))
        feeds -= feeds % self.stride
        self.samples = feeds * batch
        self._feeds = [{k: np.ascontiguousarray(v[i * batch:(i + 1) * batch]) for k, v in arrays.items()}
                       for i in range(feeds)]
        self.set_range(0, len(self._feeds))

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self.set_range(0, len(self._feeds))


def _quantized_types(path: Path) -> set[str]:
    """The integer op types a dynamic quantization left in the graph (what it actually quantized)."""
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger", "QAttention",
                             "DynamicQuantizeLinear", "QGemm", "DynamicQuantizeLSTM")}
