"""ONNX Runtime: the base install's backend (CPU everywhere, CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeml.backends.entry import Backend
from edgeml.backends.options import option


@dataclass(frozen=True)
class Options:
    ort_int8_recipes: tuple[str, ...] | None = option(
        None, "int8 recipes to try, e.g. u8u8,s8s8-per-channel-exclude-ends (default: by the target's ISA)")
    ort_accuracy_aware: bool = option(True, "add the accuracy-aware int8 recipe (sensitive nodes kept in FP32)")
    ort_calibration: str = option("minmax", "int8 calibration method", choices=("minmax", "entropy", "percentile"))
    ort_calibration_samples: int = option(256, "calibration samples used at most")
    ort_sensitivity_samples: int = option(16, "samples for the per-node sensitivity ranking")


BACKEND = Backend(
    name="onnxruntime",
    summary="ONNX Runtime: offline-optimized ONNX, static QDQ int8, fp16 on CUDA",
    options=Options,
    build="edgeml.backends.onnxruntime.build:OnnxRuntimeCompiler",
    run="edgeml.backends.onnxruntime.run:OnnxRuntimeBackend",
    errors="edgeml.backends.onnxruntime.errors:TABLE",
    portable_code=True,
)
