"""Agent side of fleet experiments: take the manager's experiment message, install the challenger beside the
champion (own folder, downloaded by sha256 and verified like any install), start the device-side
``edgeml.runtime.experiments.Experiment`` on the embedded server, and report its counters in telemetry.

The champion keeps answering throughout; a challenger that fails to download, verify or load is
reported in the agent log and the experiment simply does not run on this device.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from edgeml.errors import EdgemlError, MessageRejected
from edgeml.fleet import protocol as P

log = logging.getLogger("edgeml.fleet.arms")


class ExperimentRunner:
    def __init__(self, device_id: str, state_dir: Path, serving: Any, trusted_keys: list[Path], require_signed: bool):
        self.device_id = device_id
        self.root = Path(state_dir) / "experiments"
        self.serving = serving
        self.trusted_keys = trusted_keys
        self.require_signed = require_signed
        self.current: Any = None            # runtime.experiments.Experiment
        self.challenger: tuple[str, str] | None = None
        self._seq = -1
        self._lock = threading.Lock()
        self.problem: str | None = None

    def on_message(self, payload: bytes) -> None:
        """Validate, verify and apply (off the MQTT thread: a download may take a while)."""
        msg = P.decode(payload, "experiment message")
        if msg.get("type") != "experiment" or msg.get("device_id") != self.device_id:
            raise MessageRejected("experiment message: wrong type or device_id")
        if not isinstance(msg.get("seq"), int) or "experiment" not in msg:
            raise MessageRejected("experiment message: seq and experiment are required")
        P.verify(msg, self.trusted_keys, required=self.require_signed, where="experiment message")
        with self._lock:
            if msg["seq"] <= self._seq:
                return
            self._seq = msg["seq"]
        threading.Thread(target=self._apply, args=(msg["experiment"],), name="agent-experiment", daemon=True).start()

    def _apply(self, doc: dict[str, Any] | None) -> None:
        from edgeml.runtime.experiments import ArmPrior

        with self._lock:
            try:
                if doc is not None and self.current is not None and self.current.spec.id == doc["id"]:
                    self.current.set_priors({v: ArmPrior(int(p[0]), float(p[1]), float(p[2]))
                                             for v, p in doc.get("priors", {}).items()})
                    return
                self._stop_current()
                if doc is not None:
                    self._start(doc)
                self.problem = None
            except (EdgemlError, OSError, KeyError, TypeError, ValueError) as exc:
                self.problem = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.error("experiment not started on this device: %s", self.problem)

    def _start(self, doc: dict[str, Any]) -> None:
        from edgeml.fleet.store import download
        from edgeml.runtime.artifact import verify_zip
        from edgeml.runtime.experiments import Experiment, ExperimentSpec

        server = getattr(self.serving, "server", None)
        if server is None:
            raise EdgemlError("experiments need the embedded model server (start the agent with --port)")
        active = self.serving.active()
        if not active or active["name"] != doc["model"] or active["version"] != doc["champion"]:
            raise EdgemlError(f"this device serves {active}, not the champion {doc['model']}@{doc['champion']}")
        art = doc["challenger"]
        folder = self.root / str(doc["id"])
        path = folder / "challenger.edgepkg"
        folder.mkdir(parents=True, exist_ok=True)
        download(art["url"], path, sha256=art["sha256"], size=art["size"])
        manifest, *_ = verify_zip(path, trusted_keys=self.trusted_keys, require_signature=self.require_signed)
        if manifest["name"] != doc["model"] or manifest["version"] != art["version"]:
            raise EdgemlError(f"challenger artifact is {manifest['name']}@{manifest['version']}, expected"
                              f" {doc['model']}@{art['version']}")
        server.load(path, name=doc["model"], version=art["version"], warmup=True, make_default=False)
        self.challenger = (doc["model"], art["version"])
        spec = ExperimentSpec(id=str(doc["id"]), model=doc["model"], champion=doc["champion"],
                              challenger=art["version"], mode=doc["mode"], sample=float(doc["sample"]),
                              split=float(doc["split"]), split_by=doc["split_by"], device_arm=doc.get("device_arm"),
                              reward=doc["reward"])
        self.current = Experiment(spec, server)
        server.experiments = self.current
        log.info("experiment %s (%s) started: champion %s, challenger %s", spec.id, spec.mode, spec.champion,
                 spec.challenger)

    def _stop_current(self) -> None:
        server = getattr(self.serving, "server", None)
        if self.current is not None:
            if server is not None:
                server.experiments = None
            self.current.close()
            log.info("experiment %s stopped", self.current.spec.id)
            shutil.rmtree(self.root / self.current.spec.id, ignore_errors=True)
            self.current = None
        if self.challenger is not None and server is not None:
            try:
                server.unload(*self.challenger, wait=False)
            except Exception as exc:  # noqa: BLE001 - already gone
                log.debug("unload challenger: %s", exc)
            self.challenger = None

    def rows(self) -> list[dict[str, Any]]:
        """Telemetry rows: the running experiment's counters, latency projected onto the protocol's edges."""
        exp = self.current
        if exp is None:
            return []
        rep = exp.report()
        for part in [*rep["arms"], rep["shadow"]]:
            if part is not None:
                buckets = part["latency_buckets_ms"]
                part["latency_buckets_ms"] = {k: int(buckets[k]) for k in P.BUCKET_KEYS if k in buckets}
        return [rep]

    def close(self) -> None:
        with self._lock:
            self._stop_current()
