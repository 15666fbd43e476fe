"""``edgeml.load``: verify an artifact, open its backend, validate inputs, run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from edgeml.errors import ArtifactError, DataError, EdgemlError, UsageError
from edgeml.runtime.artifact import VerifiedArtifact, open_artifact
from edgeml.runtime.backends import RuntimeBackend, open_backend
from edgeml.runtime.manifest import MAX_THREADS, Manifest, TensorDecl


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name, e.g. "float32"
    shape: tuple[int | None, ...]    # None = dynamic axis

    @classmethod
    def from_decl(cls, decl: TensorDecl) -> "TensorSpec":
        return cls(decl.name, decl.dtype, decl.shape)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        """Strict: the manifest schema's rules (known dtype, integer or null dims)."""
        from edgeml.runtime.manifest import TensorDecl, _Field

        return cls.from_decl(TensorDecl.parse(d, _Field("tensor spec")))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def fast_check(self) -> tuple[np.dtype, int, int, tuple[Any, ...] | None, tuple[tuple[int, int], ...]]:
        """What the hot path compares: (dtype, rank, first fixed axis, the fixed tail of the shape from that
        axis when every axis after it is fixed (else None), fixed (axis, size) pairs)."""
        fixed = tuple((axis, size) for axis, size in enumerate(self.shape) if size is not None)
        lo = 1 if self.shape and self.shape[0] is None else 0
        tail = tuple(self.shape[lo:])
        return np.dtype(self.dtype), len(self.shape), lo, None if None in tail else tail, fixed

    def check(self, array: np.ndarray) -> None:
        if array.dtype != np.dtype(self.dtype):
            raise DataError(f"input '{self.name}' has dtype {array.dtype}; the model expects {self.dtype}")
        if len(array.shape) != len(self.shape) or any(
            want is not None and got != want for got, want in zip(array.shape, self.shape)
        ):
            want = "[" + ", ".join("?" if s is None else str(s) for s in self.shape) + "]"
            raise DataError(f"input '{self.name}' has shape {list(array.shape)}; the model expects {want}")


def fixed_batch(inputs: "Iterable[TensorSpec] | None") -> int | None:
    """The model's fixed batch: the first input whose first axis is static fixes it; None when dynamic.

    The one definition for the compiler's evaluation chunks and the backends' calibration batches.
    """
    for spec in inputs or ():
        if spec.shape and spec.shape[0] is not None:
            return int(spec.shape[0])
    return None


@dataclass
class SelfTestResult:
    passed: bool
    max_abs_error: float
    latency_ms: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_abs_error": self.max_abs_error, "latency_ms": self.latency_ms, "reason": self.reason}


class Model:
    """A verified artifact with its backend session."""

    def __init__(self, artifact: VerifiedArtifact, backend: RuntimeBackend, load_seconds: float):
        self.artifact = artifact
        self.spec: Manifest = artifact.typed
        self.manifest = artifact.manifest     # validated plain dict, for readers not yet on ``spec``
        self.backend = backend
        self.inputs = [TensorSpec.from_decl(d) for d in self.spec.inputs]
        self.outputs = [TensorSpec.from_decl(d) for d in self.spec.outputs]
        self._input_by_name = {s.name: s for s in self.inputs}
        self._fast = {s.name: s.fast_check() for s in self.inputs}
        self._run = backend.run          # bound once: predict is on every request's path
        self._single: tuple[str, np.dtype, int, int, tuple[Any, ...]] | None = None
        if len(self.inputs) == 1:
            dtype, rank, lo, tail, _ = self._fast[self.inputs[0].name]
            if tail is not None:
                self._single = (self.inputs[0].name, dtype, rank, lo, tail)
        self.load_seconds = load_seconds
        self.cold_start_ms: float | None = None
        self._started = time.perf_counter() - load_seconds

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def backend_name(self) -> str:
        return self.spec.backend.name

    @property
    def precision(self) -> str:
        return self.spec.precision

    def validate(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """Check names, dtypes and shapes; raise DataError naming the first problem.

        The hot path (every tensor an ndarray of the right dtype and shape) does a
        few comparisons per input and returns ``feeds`` itself; the rest is for messages.
        """
        single = self._single
        if single is not None:          # one input: the common case, without the loop
            name, dtype, rank, lo, tail = single
            if len(feeds) == 1:
                value = feeds.get(name)
                if type(value) is np.ndarray and value.dtype is dtype:
                    shape = value.shape
                    if len(shape) == rank and shape[lo:] == tail:
                        return feeds
            return self._validate_general(feeds)
        return self._validate_general(feeds)

    def _validate_general(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        fast = self._fast
        if len(feeds) != len(fast):
            return self._validate_slow(feeds)
        for name, value in feeds.items():
            want = fast.get(name)
            if want is None or type(value) is not np.ndarray:
                return self._validate_slow(feeds)
            dtype, rank, lo, tail, fixed = want
            shape = value.shape
            # builtin dtypes are singletons: ``is`` settles the usual case without numpy's comparison
            if (value.dtype is not dtype and value.dtype != dtype) or len(shape) != rank:
                return self._validate_slow(feeds)
            if tail is not None:
                if shape[lo:] != tail:
                    return self._validate_slow(feeds)
            else:
                for axis, size in fixed:
                    if shape[axis] != size:
                        return self._validate_slow(feeds)
        return feeds

    def _validate_slow(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = [k for k in feeds if k not in self._input_by_name]
        if unknown:
            raise DataError(f"unknown input {unknown[0]!r}; the model's inputs are {list(self._input_by_name)}")
        missing = [k for k in self._input_by_name if k not in feeds]
        if missing:
            raise DataError(f"missing input {missing[0]!r}; the model's inputs are {list(self._input_by_name)}")
        checked = {}
        for name, value in feeds.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            self._input_by_name[name].check(array)
            checked[name] = array
        return checked

    def predict(self, feeds: Mapping[str, Any], *, validate: bool = True) -> dict[str, np.ndarray]:
        if validate:
            feeds = self.validate(feeds)
        result = self._run(feeds if type(feeds) is dict else dict(feeds))
        if self.cold_start_ms is None:
            self.cold_start_ms = (time.perf_counter() - self._started) * 1000.0
        return result

    __call__ = predict

    def selftest(self, latency_budget_ms: float | None = None) -> SelfTestResult:
        """Run the golden inputs stored in the artifact and compare outputs."""
        spec = self.spec.selftest
        if spec is None:
            return SelfTestResult(True, 0.0, 0.0, "artifact has no golden data; load-only check")
        try:
            golden = self.artifact.golden()
        except ArtifactError as exc:
            return SelfTestResult(False, float("inf"), 0.0, f"golden data refused: {exc.message}")
        assert golden is not None
        inputs, expected = golden
        start = time.perf_counter()
        try:
            got = self.predict(inputs)
        except EdgemlError as exc:
            return SelfTestResult(False, float("inf"), 0.0, f"golden inputs failed to run: {exc}")
        latency = (time.perf_counter() - start) * 1000.0 / max(1, _batch_of(inputs))
        worst = 0.0
        for name, want in expected.items():
            have = np.asarray(got[name])
            if have.shape != want.shape:
                return SelfTestResult(False, float("inf"), latency, f"output '{name}' has shape {have.shape}, golden {want.shape}")
            err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            worst = max(worst, err)
            if not np.allclose(have, want, rtol=spec.rtol, atol=spec.atol):
                return SelfTestResult(False, worst, latency, f"output '{name}' differs from the golden output (max abs error {err:.3g})")
        budget = latency_budget_ms if latency_budget_ms is not None else spec.latency_budget_ms
        if budget is not None and latency > budget:
            return SelfTestResult(False, worst, latency, f"latency {latency:.2f} ms per sample is over the budget {budget} ms")
        return SelfTestResult(True, worst, latency)

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            self.artifact.release()


def _batch_of(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux) in MiB; elsewhere the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resident_memory_mb() -> float:
    """Current resident set size of this process, in MiB."""
    return _proc_status_mb("VmRSS")


def peak_resident_memory_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return _proc_status_mb("VmHWM")


def host_threads(requested: object, where: str = "threads") -> int | None:
    """A thread count clamped to this host's CPUs; None/0 = all cores. Negative or absurd is refused."""
    if requested is None:
        return None
    if isinstance(requested, bool) or not isinstance(requested, int) or not 0 <= requested <= MAX_THREADS:
        raise UsageError(f"{where} must be an integer from 0 (all cores) to {MAX_THREADS}, got {requested!r}")
    if requested == 0:
        return None
    return min(requested, os.cpu_count() or 1)


def load(
    path: str | Path,
    *,
    trusted_keys: list[str | Path] | None = None,
    require_signature: bool | None = None,
    threads: int | None = None,
    check_host: bool = True,
    cache_dir: str | Path | None = None,
) -> Model:
    """Load and verify an ``.edgepkg``: CPU features (before extracting), signature, hashes, member paths."""
    start = time.perf_counter()
    wanted_threads = host_threads(threads)
    artifact = open_artifact(
        Path(path),
        trusted_keys=[Path(k) for k in trusted_keys or []],
        require_signature=require_signature,
        cache_dir=Path(cache_dir) if cache_dir else None,
        precheck=_check_host if check_host else None,
    )
    try:
        spec = artifact.typed
        for member in spec.members():
            artifact.member(member)          # confined: a listed regular file inside the verified folder
        if threads is None and spec.runtime is not None:
            wanted_threads = host_threads(spec.runtime.threads, "manifest field 'runtime.threads'")
        backend = open_backend(spec.backend.name, artifact.directory, artifact.manifest, threads=wanted_threads)
    except BaseException:
        artifact.release()
        raise
    return Model(artifact, backend, time.perf_counter() - start)


def _check_host(spec: Manifest) -> None:
    from edgeml.targets import check_host_supports

    check_host_supports(spec.target, list(spec.required_features), spec.arch)
