"""The two interfaces every backend implements, and the data that crosses them.

``CompilerBackend`` (a backend's ``build.py``) proposes candidates for a target and
builds each into artifact members; ``RuntimeBackend`` (its ``run.py``) opens those
members on a device and runs them. Nothing here imports a heavy package, so a
device that imports ``edgeml.backends`` pays for numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


class CandidateSkipped(Exception):
    """Raised by a backend's build when a candidate turns out to be unnecessary (recorded as skipped)."""


@dataclass(frozen=True)
class CandidateSpec:
    backend: str
    precision: str                      # "fp32" | "fp16" | "int8"
    recipe: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    label: str = ""                     # human name, e.g. "onnxruntime/int8/qdq-reduce-range"


@dataclass(frozen=True)
class Reference:
    """What the pipeline measured on the FP32 model, for accuracy-aware builders.

    ``eval_data`` is an ``edgeml.compiler.evaluate.Dataset`` (inputs, labels,
    references); ``fp32_score`` is ``metric`` scored on it, in points.
    """

    eval_data: Any
    max_accuracy_drop: float
    metric: str | None = None            # None: the builder chooses with evaluate.choose_metric
    fp32_score: float | None = None      # None: accuracy-aware builds that need it are skipped


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
    options: Any = None                 # this backend's typed options (its ``Options`` dataclass)
    reference: Reference | None = None  # None outside the pipeline (then accuracy-aware builds are skipped)
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


class RuntimeBackend(ABC):
    """A loaded model ready to run. ``files`` is the folder of verified members."""

    name: str = ""

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        self.files = Path(files)
        self.manifest = manifest
        self.threads = threads

    @staticmethod
    @abstractmethod
    def version() -> str:
        """Version of the backend package installed here."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; feeds and results are keyed by tensor name."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract  # pragma: no cover
        pass
