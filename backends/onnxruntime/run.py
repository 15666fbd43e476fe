"""ONNX Runtime, device side: open ``model/model.onnx`` with the providers the artifact names, run batches.

Errors go through ``edgeml.backends.onnxruntime.errors`` (a missing kernel is
``UnsupportedOp`` naming the op; other failures ``BackendError`` with the reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends.onnxruntime.errors import TABLE
from edgeml.errors import BackendError, MissingDependency
from edgeml.backends.base import RuntimeBackend


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency("onnxruntime is not installed", hint="pip install edgeml") from exc
    return onnxruntime


def session_options(threads: int | None, options: dict[str, Any] | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    # The graph was optimized offline by the compiler; do not redo it at load.
    level = (options or {}).get("graph_optimization_level", "disable")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = int(threads)
    if (options or {}).get("allow_spinning") is False:   # a measured choice of the compiler (tiny models)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend(RuntimeBackend):
    name = "onnxruntime"

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        super().__init__(files, manifest, threads=threads)
        ort = _ort()
        backend = manifest["backend"]
        options = backend.get("options", {})
        providers = options.get("providers") or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        usable = [p for p in providers if p in available]
        if not usable:
            raise BackendError(
                f"artifact needs ONNX Runtime providers {providers}; this onnxruntime has {available}",
                hint="install the matching onnxruntime build (e.g. onnxruntime-gpu for CUDA)",
            )
        model_path = self.files / backend["entrypoint"]
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=session_options(threads, options), providers=usable
            )
        except Exception as exc:  # onnxruntime raises its own unexported types
            raise TABLE.map(exc, f"load {model_path.name}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The hot path: ORT's C++ session directly. Its Python ``run`` re-checks the feed names, the OrtValue
        # ownership and graph capture on every call (about 2.5 us, a quarter of a tiny MLP's run), and retries
        # on a fallback provider after an EP failure; none of that applies to a CPU-only session given every
        # input (edgeml validated the feeds already). A feed with fewer names takes ORT's own path, which names
        # the missing input.
        self._n_inputs = len(self.session.get_inputs())
        inner = getattr(self.session, "_sess", None)
        self._fast = inner.run if inner is not None and usable == ["CPUExecutionProvider"] else None
        self._one = self.output_names[0] if len(self.output_names) == 1 else None   # no dict(zip) for one output

    @staticmethod
    def version() -> str:
        return _ort().__version__

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        try:
            if self._fast is not None and len(feeds) == self._n_inputs:
                results = self._fast(names, feeds, None)
            else:
                results = self.session.run(names, feeds)
        except Exception as exc:
            raise TABLE.map(exc, "run the model") from exc
        if self._one is not None:
            return {self._one: results[0]}
        return dict(zip(names, results))
