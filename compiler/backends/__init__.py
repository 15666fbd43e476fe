"""Compiler backends: turn the imported FP32 ONNX model into runnable candidates.

One module per backend, registered by one line in COMPILER_BACKENDS. A backend
proposes candidates (precision + recipe) for a target, and builds each into
files that its runtime twin (edgeml.runtime.backends) loads. The pipeline in
edgeml.compiler then evaluates, benchmarks and selects among candidates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.registry import Registry

COMPILER_BACKENDS = Registry(
    "compiler backend",
    [
        ("onnxruntime", "edgeml.compiler.backends.onnxruntime:OnnxRuntimeCompiler"),
        ("openvino", "edgeml.compiler.backends.openvino:OpenVinoCompiler"),
        ("tvm", "edgeml.compiler.backends.tvm:TvmCompiler"),
    ],
)


@dataclass(frozen=True)
class CandidateSpec:
    backend: str
    precision: str                      # "fp32" | "fp16" | "int8"
    recipe: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    label: str = ""                     # human name, e.g. "onnxruntime/int8/qdq-reduce-range"


@dataclass
class BuildContext:
    """Everything a backend needs to build candidates for one compile."""

    onnx_path: Path                     # imported FP32 ONNX model (static shapes where known)
    target: Any                         # edgeml.targets.Target
    inputs: list[Any]                   # edgeml.runtime.model.TensorSpec
    outputs: list[Any]
    workdir: Path                       # scratch folder for this compile
    calib: dict[str, np.ndarray] | None = None      # calibration inputs (first axis = samples)
    # evaluate(files_dir, manifest_fragment) -> metric (higher is better); for accuracy-aware quantizers
    evaluate: Callable[[Path, dict[str, Any]], float] | None = None
    options: dict[str, Any] = field(default_factory=dict)   # backend-specific options (tune_budget, ...)
    progress: Callable[[str], None] = lambda message: None


@dataclass
class BuiltCandidate:
    spec: CandidateSpec
    files: dict[str, Path]              # artifact member name -> file on disk, e.g. {"model/model.onnx": ...}
    entrypoint: str                     # member the runtime backend opens
    backend_options: dict[str, Any] = field(default_factory=dict)   # -> manifest backend.options
    recipe: dict[str, Any] = field(default_factory=dict)            # final recipe (-> manifest quantization)
    notes: list[str] = field(default_factory=list)
    build_seconds: float = 0.0


class CompilerBackend(ABC):
    name: str = ""

    def unavailable_reason(self) -> str | None:
        """None when usable here; else why not (missing package, ...)."""
        return None

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def candidates(self, ctx: BuildContext, precisions: list[str]) -> list[CandidateSpec]:
        """Candidates this backend offers for ctx.target among ``precisions``."""

    @abstractmethod
    def build(self, spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
        """Build one candidate into files under ctx.workdir."""
