"""Models and versions held by a server: lookup, defaults, metadata.

Mutations happen on the server's event-loop thread (the server marshals API
calls there), so a request either resolves the old version or the new one,
never a half-switched state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.runtime.server.admission import Admission
from edgeml.runtime.server.batching import Batcher
from edgeml.runtime.server.breaker import OPEN, CircuitBreaker
from edgeml.runtime.server.cache import ResponseCache
from edgeml.runtime.server.metrics import ModelStats, ResilienceSample
from edgeml.runtime.server.protocol import ModelNotFound, datatype_of, json_dumps, tensor_metadata


@dataclass(frozen=True)
class ServeSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]
    datatype: str
    np_dtype: np.dtype
    batched: bool          # axis 0 is dynamic: requests can be concatenated

    @classmethod
    def of(cls, spec: Any) -> "ServeSpec":
        shape = tuple(spec.shape)
        return cls(spec.name, spec.dtype, shape, datatype_of(spec.dtype), np.dtype(spec.dtype),
                   bool(shape) and shape[0] is None)


class LoadedModel:
    """One model version: the edgeml Model, its batcher and its telemetry."""

    def __init__(self, model: Any, name: str, version: str, source: Path | None):
        self.model = model
        self.name = name
        self.version = version
        self.source = source
        self.input_specs = {s.name: ServeSpec.of(s) for s in model.inputs}
        self.output_specs = {s.name: ServeSpec.of(s) for s in model.outputs}
        self.output_order = [s.name for s in model.outputs]
        self.batchable = all(s.batched for s in self.input_specs.values()) and all(
            s.batched for s in self.output_specs.values())
        self.stats = ModelStats()
        self.ready = False
        self.retired = False
        self.batcher: Batcher | None = None
        self.mode = "inline"
        self.warmup_ms: float | None = None
        self.warmup_max_batch_ms: float | None = None
        self.loaded_at = time.time()
        self._metadata: bytes | None = None
        # resilience (see admission.py, breaker.py, cache.py and ModelServer.load)
        self.admission: Admission | None = None
        self.breaker: CircuitBreaker | None = None
        self.cache: ResponseCache | None = None
        self.fallback: LoadedModel | None = None     # served while this one's breaker is open
        self.on_fallback = False                      # the last request went to the fallback
        self.fallback_switches = 0                    # primary -> fallback and back, both counted
        self.fallback_requests = 0
        self.stand_in_for: str | None = None          # this is a fallback loaded because the primary failed: why
        self.retry: Any = None                        # fallback.PrimaryRetry of the primary it stands in for

    @property
    def backend_name(self) -> str:
        return self.model.backend_name

    @property
    def precision(self) -> str:
        return self.model.precision

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.backend.run(feeds)

    def example_feeds(self, rows: int = 1) -> dict[str, np.ndarray]:
        feeds = {}
        for s in self.input_specs.values():
            shape = [rows if (i == 0 and s.batched) else (1 if d is None else d) for i, d in enumerate(s.shape)]
            feeds[s.name] = np.zeros(shape, dtype=s.np_dtype)
        return feeds

    def warmup(self, max_batch: int, repeats: int = 5) -> tuple[float, float]:
        """Run zeros at batch 1 and at max batch; return median times in ms (batch 1, max batch)."""

        def median(feeds: dict[str, np.ndarray]) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.run(feeds)
                times.append((time.perf_counter() - t0) * 1000.0)
            return sorted(times)[len(times) // 2]

        self.warmup_ms = median(self.example_feeds(1))
        self.warmup_max_batch_ms = self.warmup_ms
        if self.batchable and max_batch > 1:
            self.warmup_max_batch_ms = median(self.example_feeds(max_batch))
        return self.warmup_ms, self.warmup_max_batch_ms

    def available(self, now: float) -> bool:
        """Ready and able to answer: loaded, and its breaker closed (or due a probe) or a fallback ready."""
        if not self.ready:
            return False
        b = self.breaker
        if b is None or b.state != OPEN or now >= b.open_until:
            return True
        return self.fallback is not None and self.fallback.available(now)

    def resilience(self) -> ResilienceSample:
        b, c, a = self.breaker, self.cache, self.admission
        return ResilienceSample(
            breaker_state=b.state if b is not None else "off", breaker_opens=b.opened if b is not None else 0,
            admitted=a.inflight if a is not None else 0,
            refused_inflight=a.refused_inflight if a is not None else 0,
            refused_queue=a.refused_queue if a is not None else 0,
            cache_hits=c.hits if c is not None else 0, cache_misses=c.misses if c is not None else 0,
            cache_evictions=c.evictions if c is not None else 0, cache_bytes=c.bytes if c is not None else 0,
            cache_entries=len(c) if c is not None else 0, fallback_active=self.on_fallback or bool(self.stand_in_for),
            fallback_switches=self.fallback_switches, fallback_requests=self.fallback_requests)

    def info(self, default: bool) -> dict[str, Any]:
        """What ``ModelServer.models()`` (and so the fleet agent) reports about this version."""
        fb = self.fallback
        return {
            "name": self.name, "version": self.version, "default": default, "ready": self.ready,
            "backend": self.backend_name, "precision": self.precision, "batch_mode": self.mode,
            "batchable": self.batchable, "source": str(self.source) if self.source else None,
            "warmup_ms": self.warmup_ms, "warmup_max_batch_ms": self.warmup_max_batch_ms,
            "breaker": self.breaker.state if self.breaker is not None else "off",
            "cache": self.cache is not None,
            "fallback": None if fb is None and self.stand_in_for is None else {
                "active": self.on_fallback or self.stand_in_for is not None,
                "source": str(fb.source) if fb is not None and fb.source else None,
                "backend": fb.backend_name if fb is not None else None,
                "primary_load_error": self.stand_in_for,
                "switches": self.fallback_switches, "requests": self.fallback_requests},
        }

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": f"{self.backend_name}",
            "inputs": tensor_metadata(list(self.input_specs.values())),
            "outputs": tensor_metadata(list(self.output_specs.values())),
        }


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, LoadedModel] = field(default_factory=dict)
    default: str | None = None
    order: list[str] = field(default_factory=list)     # load order, oldest first
    source: Path | None = None                          # last artifact loaded under this name


class Repository:
    def __init__(self) -> None:
        self.entries: dict[str, ModelEntry] = {}
        self._meta_cache: dict[tuple[str, str | None], bytes] = {}

    def resolve(self, name: str, version: str | None = None) -> LoadedModel:
        entry = self.entries.get(name)
        if entry is None or not entry.versions:
            known = sorted(n for n, e in self.entries.items() if e.versions)
            raise ModelNotFound(f"unknown model {name!r}; this server has {known}")
        if version is None:
            version = entry.default
        lm = entry.versions.get(version) if version is not None else None
        if lm is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {list(entry.versions)}")
        return lm

    def add(self, lm: LoadedModel, make_default: bool) -> LoadedModel | None:
        """Insert (replacing the same version); return the replaced LoadedModel, if any."""
        entry = self.entries.setdefault(lm.name, ModelEntry(lm.name))
        old = entry.versions.get(lm.version)
        entry.versions[lm.version] = lm
        if lm.version in entry.order:
            entry.order.remove(lm.version)
        entry.order.append(lm.version)
        if make_default or entry.default is None or entry.default not in entry.versions:
            entry.default = lm.version
        if lm.source is not None:
            entry.source = lm.source
        self._meta_cache.clear()
        return old

    def remove(self, name: str, version: str) -> LoadedModel | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        lm = entry.versions.pop(version, None)
        if version in entry.order:
            entry.order.remove(version)
        if entry.default == version:
            entry.default = entry.order[-1] if entry.order else None
        self._meta_cache.clear()
        return lm

    def all(self) -> list[tuple[LoadedModel, bool]]:
        return [(lm, e.default == v) for e in self.entries.values() for v, lm in e.versions.items()]

    def metadata_bytes(self, name: str, version: str | None) -> bytes:
        key = (name, version)
        cached = self._meta_cache.get(key)
        if cached is None:
            lm = self.resolve(name, version)
            cached = json_dumps(lm.metadata(list(self.entries[name].versions)))
            self._meta_cache[key] = cached
        return cached
