"""The state of one compile: what the pipeline measured and decided, kept out of the user's options.

``CompileSession`` holds the validated options, the target, the scratch folder,
the imported model, the FP32 ``Reference`` and every candidate; the pipeline's
steps (edgeml.compiler.pipeline) each take the session and do one thing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.backends.base import BuildContext, BuiltCandidate, CandidateSpec, Reference as BuildReference, RuntimeBackend
from edgeml.compiler import evaluate as ev
from edgeml.compiler.importers import ImportedModel
from edgeml.compiler.options import CompileOptions
from edgeml.compiler.prune import PruneRecipe
from edgeml.compiler.worker import CandidateHandle, Limits, WorkerPool
from edgeml.errors import EdgemlError


@dataclass
class Reference:
    """The FP32 model measured on the eval data: what every candidate is compared with."""

    eval_set: ev.Dataset
    calib_set: ev.Dataset | None
    outputs: dict[str, np.ndarray]           # FP32 outputs on eval_set, keyed by output name
    output_names: list[str]
    metric: str
    score: ev.Score
    batch: int | None                        # the model's fixed batch, None when dynamic
    metric_choice: ev.MetricChoice | None = None   # why ``metric`` (auto from the outputs, or --metric)

    def for_builders(self, max_accuracy_drop: float) -> BuildReference:
        return BuildReference(eval_data=self.eval_set, max_accuracy_drop=max_accuracy_drop, metric=self.metric,
                              fp32_score=self.score.value)

    def score_of(self, outputs: dict[str, np.ndarray]) -> ev.Score:
        return ev.score(self.metric, outputs, self.outputs, self.eval_set, self.output_names)


@dataclass
class Candidate:
    index: int
    spec: CandidateSpec
    status: str = "pending"       # selected | passed | rejected | failed | unverified | skipped
    reason: str | None = None
    built: BuiltCandidate | None = None
    runtime: CandidateHandle | RuntimeBackend | None = None   # loaded in a worker (compiler/worker.py)
    backend_version: str = ""
    score: ev.Score | None = None
    drop: float | None = None
    latency: dict[str, float] | None = None
    error: EdgemlError | None = None
    eval_samples: int | None = None  # set when evaluated on fewer than all eval samples
    context: BuildContext | None = None   # the build context of its source model (dense or pruned)
    pruning: PruneRecipe | None = None    # set for a candidate built from a pruned model
    verification: dict[str, Any] | None = None   # where and with which kernels it was run (or why not)
    host_check: str | None = None         # passed | rejected: an indicative run with this host's kernels
    peak_rss_mb: float | None = None      # its worker's peak RSS (load + eval + benchmark)
    threads: int | None = None            # runtime threads it was measured with (None: the target's default)
    size_mb: float | None = None          # its artifact members' total size
    thread_choice: dict[str, float] | None = None   # tiny models: p50 with the default threads vs one thread
    memory: dict[str, float] | None = None   # fresh-worker RSS: baseline, after load, after batch-1 runs

    def close_runtime(self) -> None:
        if self.runtime is not None:
            try:
                self.runtime.close()
            except Exception:  # closing is best effort
                pass
            self.runtime = None

    @property
    def recipe(self) -> dict[str, Any]:
        return self.built.recipe if self.built else dict(self.spec.recipe)

    def to_dict(self, reproducible: bool) -> dict[str, Any]:
        d = self._record(reproducible)
        if self.pruning is not None:
            d["pruning"] = self.pruning.to_dict(reproducible)
        return d

    def _record(self, reproducible: bool) -> dict[str, Any]:
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
            "verification": self.verification,
            "threads": self.threads,
            "thread_choice": None if reproducible else self.thread_choice,
            "size_mb": self.size_mb,
            "memory": None if reproducible else self.memory,
            "peak_rss_mb": None if reproducible else self.peak_rss_mb,
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
                "notes": self.notes, "fallback": (m.get("runtime") or {}).get("fallback")}


@dataclass
class CompileSession:
    opts: CompileOptions
    target: Any                              # edgeml.targets.Target
    workdir: Path
    epoch: int | None                        # SOURCE_DATE_EPOCH: reproducible build when set
    say: Callable[[str], None]
    start: float = field(default_factory=time.perf_counter)
    imported: ImportedModel | None = None
    ref: Reference | None = None
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    _pool: WorkerPool | None = None

    @property
    def pool(self) -> WorkerPool:
        """The candidates' worker processes (started on first use, stopped by close)."""
        if self._pool is None:
            limits = Limits(timeout_s=self.opts.candidate_timeout_s,
                            **({"memory_mb": self.opts.candidate_memory_mb} if self.opts.candidate_memory_mb else {}))
            self._pool = WorkerPool(self.workdir / "workers", limits, self.opts.isolation)
        return self._pool

    @property
    def threads(self) -> int | None:
        return self.target.default_threads or None

    @property
    def model(self) -> ImportedModel:
        assert self.imported is not None, "the model is imported before this step"
        return self.imported

    @property
    def reference(self) -> Reference:
        assert self.ref is not None, "the FP32 reference is measured before this step"
        return self.ref

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        for c in self.candidates:
            c.close_runtime()
        if self._pool is not None:
            self._pool.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
