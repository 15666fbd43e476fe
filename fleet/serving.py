"""What the agent serves with, behind one small interface (``Serving``).

* ``LocalServing``   edgeml.load + Model.selftest in process; hot swap under a
                     lock; with ``http_port`` set and edgeml.runtime.server
                     available it embeds the KServe v2 ModelServer instead.
* ``StubServing``    the fleet simulator's stand-in: no model is run (it says
                     so in every telemetry message: ``stubbed: true``).

Every implementation counts requests, failures and a mergeable latency
histogram per (name, version); ``probe()`` runs the artifact's golden inputs
on the active model (used during the health window).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeml.errors import EdgemlError, FleetError
from edgeml.fleet.metrics import Histogram
from edgeml.runtime.drift import DEFAULT_RATE, Monitor

log = logging.getLogger("edgeml.fleet.serving")


@dataclass
class CheckResult:
    passed: bool
    reason: str | None = None
    latency_ms: float = 0.0


class Serving(Protocol):
    stubbed: bool

    def selftest(self, path: Path, *, trusted_keys: list[Path], require_signature: bool) -> CheckResult: ...
    def activate(self, path: Path, name: str, version: str) -> None: ...
    def deactivate(self) -> None: ...
    def probe(self) -> float: ...
    def stats(self) -> list[dict[str, Any]]: ...
    def active(self) -> dict[str, str] | None: ...
    def ready(self) -> bool: ...
    def close(self) -> None: ...


class _Counters:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self.requests = 0
        self.failures = 0
        self.hist = Histogram()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "requests": self.requests, "failures": self.failures,
                "latency_buckets_ms": self.hist.cumulative(), "latency_sum_ms": round(self.hist.sum_ms, 3)}


class LocalServing:
    """In-process serving (no HTTP): edgeml.load + predict under a lock."""

    stubbed = False

    def __init__(self, cache_dir: Path, *, check_host: bool = True, drift_rate: float = DEFAULT_RATE):
        self.cache_dir = Path(cache_dir)
        self.check_host = check_host
        self.drift = Monitor(drift_rate)     # sampled live inputs/outputs -> telemetry ``drift`` rows
        self._lock = threading.RLock()
        self._model = None
        self._golden: dict[str, Any] | None = None
        self._active: dict[str, str] | None = None
        self._counters: dict[tuple[str, str], _Counters] = {}
        self.server = None
        self.address: tuple[str, int] | None = None

    # --------------------------------------------------------------- checks
    def selftest(self, path: Path, *, trusted_keys: list[Path], require_signature: bool) -> CheckResult:
        import edgeml

        try:
            model = edgeml.load(path, trusted_keys=trusted_keys, require_signature=require_signature,
                                check_host=self.check_host, cache_dir=self.cache_dir)
        except EdgemlError as exc:
            return CheckResult(False, f"load failed: {exc.message}")
        try:
            result = model.selftest()
        except Exception as exc:  # noqa: BLE001 - a backend crash is a failed self-test, not an agent crash
            return CheckResult(False, f"self-test raised {type(exc).__name__}: {exc}")
        finally:
            model.close()
        return CheckResult(result.passed, result.reason if not result.passed else None, result.latency_ms)

    # --------------------------------------------------------------- serving
    def activate(self, path: Path, name: str, version: str) -> None:
        import edgeml

        model = edgeml.load(path, check_host=self.check_host, cache_dir=self.cache_dir)
        golden = golden_inputs(model)
        with self._lock:
            old, was = self._model, self._active
            self._model, self._golden, self._active = model, golden, {"name": name, "version": version}
            self._counters.setdefault((name, version), _Counters(name, version))
        if was and was != self._active:
            self.drift.detach(was["name"], was["version"])
        self.drift.attach(name, version, model.manifest)
        if old is not None:
            old.close()

    def deactivate(self) -> None:
        with self._lock:
            old = self._model
            self._model, self._golden, self._active = None, None, None
        if old is not None:
            old.close()

    def active(self) -> dict[str, str] | None:
        return dict(self._active) if self._active else None

    def ready(self) -> bool:
        return self._model is not None

    def predict(self, feeds: dict[str, Any], *, sample: bool = True) -> dict[str, Any]:
        with self._lock:
            model, active = self._model, self._active
        if model is None:
            raise FleetError("no model is active on this device")
        counters = self._counters[(active["name"], active["version"])]
        start = time.perf_counter()
        try:
            out = model.predict(feeds)
        except Exception:
            counters.requests += 1
            counters.failures += 1
            raise
        counters.requests += 1
        counters.hist.observe((time.perf_counter() - start) * 1000.0)
        if sample:
            self.drift.offer(active["name"], active["version"], feeds, out)
        return out

    def probe(self) -> float:
        """Run the golden inputs once on the active model; returns latency (ms) or raises."""
        if self._golden is None:
            if self._model is None:
                raise FleetError("no model is active")
            return 0.0
        start = time.perf_counter()
        self.predict(self._golden, sample=False)     # the same golden input every probe is not live data
        return (time.perf_counter() - start) * 1000.0

    def stats(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self._counters.values()]

    def drift_windows(self) -> list[dict[str, Any]]:
        return self.drift.windows()

    def close(self) -> None:
        self.deactivate()
        self.drift.close()


class HttpServing:
    """Embeds edgeml.runtime.server.ModelServer (KServe v2 over HTTP): hot swap = ``server.load`` of the
    new version as default, then the old version is unloaded (its in-flight requests drain). Health
    probes are real HTTP infer requests, so they appear in the server's own counters."""

    stubbed = False

    def __init__(self, cache_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, check_host: bool = True,
                 admin_token: str | None = None, drift_rate: float = DEFAULT_RATE):
        from edgeml.runtime.server import ModelServer

        self.cache_dir = Path(cache_dir)
        self.check_host = check_host
        self._local = LocalServing(cache_dir, check_host=check_host)   # for the self-test only
        self.server = ModelServer(server_config(host=host, port=port, cache_dir=self.cache_dir, check_host=check_host,
                                                admin_token=admin_token))
        self.drift = Monitor(drift_rate)
        # probes are not sampled into drift sketches: the same golden input every health window would skew
        # them (requests answered while a probe runs are skipped too: the draw stays independent of the data)
        self._probing = threading.Event()
        self.server.observer = lambda lm, inputs, outputs: (
            None if self._probing.is_set() else self.drift.offer(lm.name, lm.version, inputs, outputs))
        self.address = self.server.start()
        self._active: dict[str, str] | None = None
        self._golden: dict[str, Any] | None = None
        self._last: dict[tuple[str, str], dict[str, Any]] = {}
        log.info("model server listening on http://%s:%s", *self.address)

    def selftest(self, path: Path, *, trusted_keys: list[Path], require_signature: bool) -> CheckResult:
        return self._local.selftest(path, trusted_keys=trusted_keys, require_signature=require_signature)

    def activate(self, path: Path, name: str, version: str) -> None:
        lm = self.server.load(path, name=name, version=version, warmup=True, make_default=True)
        golden = golden_inputs(lm.model)   # read from the verified, extracted artifact
        old, self._active, self._golden = self._active, {"name": name, "version": version}, golden
        self.drift.attach(name, version, lm.model.manifest)
        if old and old != self._active:
            self.drift.detach(old["name"], old["version"])
            self._snapshot(old)
            try:
                self.server.unload(old["name"], old["version"], wait=False)
            except Exception as exc:  # noqa: BLE001 - already gone is fine
                log.debug("unload of %s: %s", old, exc)

    def deactivate(self) -> None:
        old, self._active, self._golden = self._active, None, None
        if old:
            self._snapshot(old)
            try:
                self.server.unload(old["name"], old["version"], wait=False)
            except Exception:  # noqa: BLE001
                pass

    def active(self) -> dict[str, str] | None:
        return dict(self._active) if self._active else None

    def ready(self) -> bool:
        """The embedded server's own answer (``GET .../ready``): a model unloaded behind the agent's back
        (e.g. through the repository API) is not ready, whatever the agent believes it serves."""
        import urllib.error
        import urllib.request

        if self._active is None:
            return False
        url = (f"http://{self.address[0]}:{self.address[1]}/v2/models/{self._active['name']}"
               f"/versions/{self._active['version']}/ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def probe(self) -> float:
        import json as _json
        import urllib.request

        import numpy as np

        if self._active is None:
            raise FleetError("no model is active")
        if not self._golden:
            return 0.0
        from edgeml.runtime.dtypes import datatype_of

        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": datatype_of(v.dtype),
                            "data": np.asarray(v).ravel().tolist()} for k, v in self._golden.items()]}
        url = (f"http://{self.address[0]}:{self.address[1]}/v2/models/{self._active['name']}"
               f"/versions/{self._active['version']}/infer")
        req = urllib.request.Request(url, data=_json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        self._probing.set()
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        finally:
            self._probing.clear()
        return (time.perf_counter() - start) * 1000.0

    def _snapshot(self, which: dict[str, str]) -> None:
        try:
            self._last[(which["name"], which["version"])] = self._row(which)
        except Exception:  # noqa: BLE001 - not loaded any more
            pass

    def _row(self, which: dict[str, str]) -> dict[str, Any]:
        from edgeml.fleet.protocol import BUCKET_KEYS

        s = self.server.stats(which["name"], which["version"])
        buckets = {str(k): int(v) for k, v in s.get("latency_buckets_ms", {}).items()}
        wanted = BUCKET_KEYS
        # the server's edges are a superset of the protocol's: project, never re-bucket
        return {"name": which["name"], "version": which["version"], "requests": int(s.get("requests", 0)),
                "failures": int(s.get("failures", 0)), "latency_buckets_ms": {k: buckets[k] for k in wanted if k in buckets},
                "latency_sum_ms": round(float(s.get("latency_sum_ms", 0.0)), 3),
                "resilience": self._resilience(which, s.get("resilience") or {})}

    def _resilience(self, which: dict[str, str], sample: dict[str, Any]) -> dict[str, Any]:
        """Breaker / admission / fallback state for telemetry (fleet/resilience.py), incl. why the primary failed."""
        from edgeml.fleet.resilience import from_server

        info = next((m for m in self.server.models()
                     if m["name"] == which["name"] and m["version"] == which["version"]), None)
        return from_server(sample, info).to_wire()

    def stats(self) -> list[dict[str, Any]]:
        rows = dict(self._last)
        if self._active:
            try:
                rows[(self._active["name"], self._active["version"])] = self._row(self._active)
            except Exception as exc:  # noqa: BLE001
                log.debug("stats: %s", exc)
        return list(rows.values())

    def drift_windows(self) -> list[dict[str, Any]]:
        return self.drift.windows()

    def close(self) -> None:
        self.server.stop(drain_timeout=2)
        self.drift.close()


def golden_inputs(model: Any) -> dict[str, Any] | None:
    """The golden inputs of a loaded (so verified) model, read by the runtime's one golden-data reader
    (``VerifiedArtifact.golden``: hash, size, names and dtypes checked against the manifest)."""
    golden = model.artifact.golden()
    return golden[0] if golden else None


def server_config(*, admin_token: str | None, **kw: Any) -> Any:
    """The embedded server's config. Its repository API (load/unload over HTTP) stays off (403) unless the
    user gave the agent ``--admin-token``: a local client must not be able to unload the device's model."""
    from edgeml.runtime.server import ServerConfig

    kw.setdefault("log_json", False)   # the agent's stderr: one human format (its own logs are text too)
    return ServerConfig(admin_token=admin_token, **kw)


def make_serving(cache_dir: Path, *, http_host: str = "127.0.0.1", http_port: int | None = 8000,
                 admin_token: str | None = None, drift_rate: float = DEFAULT_RATE):
    """HttpServing when a port is given and edgeml.runtime.server is installed, else LocalServing."""
    if http_port is not None:
        try:
            return HttpServing(cache_dir, host=http_host, port=http_port, admin_token=admin_token,
                               drift_rate=drift_rate)
        except ImportError as exc:
            log.warning("edgeml.runtime.server is not available (%s); serving in process only, no HTTP", exc)
    return LocalServing(cache_dir, drift_rate=drift_rate)


class StubServing:
    """Simulator stand-in: the model run is stubbed (``fail_selftest`` decides the self-test)."""

    stubbed = True

    def __init__(self, *, fail_selftest: bool = False, fail_versions: set[str] | None = None,
                 fail_reason: str = "stubbed self-test failure (simulated)", latency_ms: float = 2.0):
        self.fail_selftest = fail_selftest
        self.fail_versions = fail_versions      # None: every version fails when fail_selftest
        self.fail_reason = fail_reason
        self.latency_ms = latency_ms
        self._active: dict[str, str] | None = None
        self._counters: dict[tuple[str, str], _Counters] = {}

    def selftest(self, path: Path, *, trusted_keys: list[Path], require_signature: bool) -> CheckResult:
        if self.fail_selftest:
            from edgeml.runtime.artifact import read_manifest

            if self.fail_versions is None or read_manifest(path)["version"] in self.fail_versions:
                return CheckResult(False, self.fail_reason)
        return CheckResult(True, None, self.latency_ms)

    def activate(self, path: Path, name: str, version: str) -> None:
        self._active = {"name": name, "version": version}
        self._counters.setdefault((name, version), _Counters(name, version))

    def deactivate(self) -> None:
        self._active = None

    def active(self) -> dict[str, str] | None:
        return dict(self._active) if self._active else None

    def ready(self) -> bool:
        return self._active is not None

    def probe(self) -> float:
        if self._active is None:
            raise FleetError("no model is active")
        c = self._counters[(self._active["name"], self._active["version"])]
        c.requests += 1
        c.hist.observe(self.latency_ms)
        return self.latency_ms

    def stats(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self._counters.values()]

    def close(self) -> None:
        self._active = None
