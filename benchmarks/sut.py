"""The system under test: an ``.edgepkg`` (via ``edgeml.load``) or a raw ``.onnx`` (ONNX Runtime defaults).

A ``BenchTarget`` knows its inputs, makes random feeds for a batch size, and
hands out one *runner* per worker thread (a callable that runs one batch).
ONNX Runtime sessions are thread-safe, so workers share one; other backends
(an OpenVINO infer request, a TVM module) get their own loaded copy per worker.
Opening measures the cold start (load to first inference) with the injected clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.errors import ModelError, UsageError
from edgeml.runtime.model import TensorSpec, resident_memory_mb

Runner = Callable[[dict[str, np.ndarray]], Any]

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def random_array(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random data of the spec's dtype; axis 0 is the batch when dynamic."""
    shape = []
    for axis, dim in enumerate(spec.shape):
        if dim is None:
            if axis != 0:
                raise UsageError(
                    f"input '{spec.name}' has a dynamic axis {axis}; edgeml bench fills only axis 0 (the batch)",
                    hint="compile or export the model with fixed non-batch dimensions",
                )
            dim = batch
        shape.append(dim)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise UsageError(f"input '{spec.name}' has dtype {spec.dtype}, which edgeml bench cannot generate")


def batch_of(specs: list[TensorSpec], requested: int) -> int:
    """The batch a query really uses: --batch for a dynamic axis 0, else the static size."""
    static = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    dynamic = any(s.shape and s.shape[0] is None for s in specs)
    if static and not dynamic:
        size = static.pop() if len(static) == 1 else None
        if size is None:
            raise UsageError(f"inputs disagree on axis 0 ({sorted(static)}); cannot pick a batch")
        if requested not in (1, size):
            raise UsageError(f"the model's batch axis is fixed at {size}; --batch {requested} cannot apply",
                             hint="export the model with a dynamic batch axis, or leave --batch out")
        return size
    return requested


class BenchTarget:
    """Base: subclasses set ``inputs``, ``info`` and implement ``_new_runner``."""

    kind = "abstract"
    shares_runner = True

    def __init__(self, path: Path | str, *, threads: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.path = Path(path)
        self.threads = threads
        self.clock = clock
        self.inputs: list[TensorSpec] = []
        self.info: dict[str, Any] = {}
        self.cold_start: dict[str, float] = {}
        self.memory: dict[str, float] = {}
        self._runners: list[Runner] = []

    # -- data
    def make_feeds(self, batch: int, rng: np.random.Generator, count: int = 4) -> list[dict[str, np.ndarray]]:
        return [{s.name: random_array(s, batch, rng) for s in self.inputs} for _ in range(max(1, count))]

    def batch_for(self, requested: int) -> int:
        return batch_of(self.inputs, requested)

    # -- runners
    def _new_runner(self, first: bool) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError

    def runners(self, n: int) -> list[Runner]:
        """``n`` runners for ``n`` concurrent workers (shared when the backend is thread-safe)."""
        while len(self._runners) < n:
            if self._runners and self.shares_runner:
                self._runners.append(self._runners[0])
            else:
                self._runners.append(self._new_runner(first=not self._runners))
        return self._runners[:n]

    def open(self, rng: np.random.Generator) -> "BenchTarget":
        """Load and run the first inference; records cold start and memory."""
        self.memory["rss_before_load_mb"] = round(resident_memory_mb(), 1)
        t0 = self.clock()
        runner = self.runners(1)[0]
        t1 = self.clock()
        feeds = self.make_feeds(self.batch_for(1), rng, count=1)[0]
        runner(feeds)
        t2 = self.clock()
        self.cold_start = {"load_ms": (t1 - t0) * 1e3, "first_inference_ms": (t2 - t1) * 1e3,
                           "cold_start_ms": (t2 - t0) * 1e3}
        self.memory["rss_after_load_mb"] = round(resident_memory_mb(), 1)
        return self

    def close(self) -> None:
        self._runners.clear()


class OnnxTarget(BenchTarget):
    """A raw ONNX file on ONNX Runtime with its default session options ("before compile")."""

    kind = "onnx"

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        import onnxruntime as ort

        if not self.path.is_file():
            raise ModelError(f"model {self.path} does not exist")
        self._ort = ort
        session = self._session()
        self._first_session = session
        self.inputs = [TensorSpec(i.name, _ORT_TYPES.get(i.type, "float32"),
                                  tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape))
                       for i in session.get_inputs()]
        from edgeml.runtime.signing import file_sha256

        self.info = {
            "kind": "onnx", "path": str(self.path), "name": self.path.stem, "version": None,
            "sha256": file_sha256(self.path), "precision": _onnx_precision(self.inputs),
            "backend": "onnxruntime", "backend_version": ort.__version__,
            "backend_options": {"session_options": "onnxruntime defaults", "intra_op_threads": self.threads},
            "target": None, "inputs": [s.to_dict() for s in self.inputs],
        }

    def _session(self):
        so = self._ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        try:
            return self._ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unexported types
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {exc}",
                             hint="check the file is a valid ONNX model (python -m onnx.checker)") from exc

    def _new_runner(self, first: bool) -> Runner:
        session = self._first_session if first and self._first_session is not None else self._session()
        self._first_session = None
        return lambda feeds: session.run(None, feeds)

    def open(self, rng):
        # Cold start = session creation + first inference, measured fresh.
        self._first_session = None
        self._runners.clear()
        return super().open(rng)


def _onnx_precision(inputs: list[TensorSpec]) -> str:
    return "fp16" if any(s.dtype == "float16" for s in inputs) else "fp32"


class ArtifactTarget(BenchTarget):
    """An ``.edgepkg`` loaded and verified by ``edgeml.load``."""

    kind = "edgepkg"

    def __init__(self, path, *, trusted_keys=None, cache_dir=None, **kw):
        super().__init__(path, **kw)
        from edgeml.runtime.artifact import artifact_sha256, read_manifest

        manifest = read_manifest(self.path)
        self._load_kw = {"trusted_keys": list(trusted_keys or []), "threads": self.threads}
        if cache_dir:
            self._load_kw["cache_dir"] = cache_dir
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.shares_runner = manifest["backend"]["name"] == "onnxruntime"
        self.models: list[Any] = []
        backend = manifest["backend"]
        self.info = {
            "kind": "edgepkg", "path": str(self.path), "name": manifest["name"], "version": manifest["version"],
            "sha256": artifact_sha256(self.path), "precision": manifest["precision"],
            "backend": backend["name"], "backend_version": backend.get("version"),
            "backend_options": backend.get("options", {}), "target": manifest["target"],
            "quantization": manifest.get("quantization"), "inputs": [s.to_dict() for s in self.inputs],
        }

    def _new_runner(self, first: bool) -> Runner:
        import edgeml

        model = edgeml.load(self.path, **self._load_kw)
        self.models.append(model)
        self.info.setdefault("backend_version_loaded", model.backend.version())
        return lambda feeds: model.predict(feeds, validate=False)

    def close(self) -> None:
        for m in self.models:
            m.close()
        self.models.clear()
        super().close()


def open_target(path: Path | str, *, threads: int | None = None, clock: Callable[[], float] = time.perf_counter,
                rng: np.random.Generator | None = None, **kw) -> BenchTarget:
    """Open ``path`` (.edgepkg or .onnx) and run its first inference."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist", hint="pass an .edgepkg from edgeml compile, or an .onnx file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        target: BenchTarget = OnnxTarget(path, threads=threads, clock=clock)
    elif suffix == ".edgepkg":
        target = ArtifactTarget(path, threads=threads, clock=clock, **kw)
    else:
        raise UsageError(f"{path} is neither an .edgepkg nor an .onnx file",
                         hint="edgeml bench takes a compiled artifact or a raw ONNX model")
    return target.open(rng if rng is not None else np.random.default_rng(0))
