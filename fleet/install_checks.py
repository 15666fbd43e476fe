"""An agent's install checks: fetch the artifact into a slot, verify it, watch the health window.

A mixin of ``AgentCore`` (fleet/agent.py), split out of it so the install state machine there stays readable.
Each check raises ``InstallFailed`` (with the protocol's ``FailureCode``), ``Superseded`` when a newer desired
state arrived meanwhile, or ``Interrupted`` when the agent is stopping; ``AgentCore.install`` turns those into
events and a rollback of serving where needed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeml.errors import EdgemlError
from edgeml.fleet.serving import Serving
from edgeml.fleet.slots import Journal, Slots
from edgeml.fleet.states import FailureCode

if TYPE_CHECKING:
    from edgeml.fleet.agent import AgentConfig

log = logging.getLogger("edgeml.fleet.agent")   # the agent's logger: operators filter on this name


class InstallFailed(Exception):
    def __init__(self, reason: str, code: FailureCode, *, after_swap: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.after_swap = after_swap


class Superseded(Exception):
    code = FailureCode.SUPERSEDED


class Interrupted(Exception):
    """The agent is stopping mid-install: leave the journal as it is; the next start resumes."""


class InstallChecks:
    """Download (with retries), verification and the health window of one install; state from ``AgentCore``."""

    config: AgentConfig
    serving: Serving
    journal: Journal
    slots: Slots
    downloader: Callable[..., Path]
    _lock: threading.RLock
    _wanted: dict[str, Any] | None
    _stop: threading.Event

    def _journal_state(self, desired: dict[str, Any], attempt: int, state: str, **extra: Any) -> None:
        raise NotImplementedError   # AgentCore's: journal the step, then send its event

    def _stage_artifact(self, desired: dict[str, Any], attempt: int) -> Path:
        art = desired["artifact"]
        j = self.journal.data
        for rec in (j["committed"], j["previous"]):   # reuse a slot we already hold (rollbacks)
            if rec and rec.get("sha256") == art["sha256"] and rec.get("slot") and Path(rec["slot"]).is_file():
                return Path(rec["slot"])
        path = self.slots.artifact(desired["seq"], art["sha256"])
        self._journal_state(desired, attempt, "downloading", slot=str(path))
        from edgeml.errors import ArtifactError

        # network trouble (store restarting, link down) is retried with backoff + jitter until
        # download_patience_s; content that does not match its sha256 fails at once
        deadline = time.monotonic() + self.config.download_patience_s
        i = 0
        while True:
            try:
                return self.downloader(art["url"], path, sha256=art["sha256"], size=art["size"])
            except ArtifactError as exc:   # wrong content, HTTP 4xx, wrong size: retrying cannot help
                raise InstallFailed(f"download failed: {exc.message}", FailureCode.DOWNLOAD) from None
            except EdgemlError as exc:
                i += 1
                if self._stop.is_set():
                    raise Interrupted() from None
                if time.monotonic() >= deadline:
                    raise InstallFailed(f"download failed after {i} attempts: {exc.message}",
                                        FailureCode.DOWNLOAD) from None
                log.warning("download attempt %d failed (will retry): %s", i, exc.message)
                with self._lock:
                    if self._wanted is not None and self._wanted["seq"] > desired["seq"]:
                        raise Superseded(f"superseded by deployment {self._wanted['deployment_id']}") from None
                self._stop.wait(random.uniform(0.5, 1.0) * min(0.25 * 2 ** i, 10.0))

    def _verify(self, path: Path, art: dict[str, Any]) -> None:
        from edgeml.errors import UnsupportedHost
        from edgeml.runtime.artifact import verify_zip
        from edgeml.targets import check_host_supports

        try:
            manifest, _, signer, _ = verify_zip(path, trusted_keys=self.config.trusted_keys,
                                                require_signature=self.config.require_signed)
        except EdgemlError as exc:
            raise InstallFailed(f"verification failed: {exc.message}", FailureCode.VERIFICATION) from None
        if manifest["name"] != art["name"] or manifest["version"] != art["version"]:
            raise InstallFailed(f"artifact is {manifest['name']}@{manifest['version']}, the manager said"
                                f" {art['name']}@{art['version']}", FailureCode.VERIFICATION)
        if self.config.check_host:
            try:
                check_host_supports(manifest["target"], manifest["required_features"], manifest["arch"])
            except UnsupportedHost as exc:
                raise InstallFailed(f"target check failed: {exc.message}", FailureCode.TARGET) from None

    def _health_window(self, desired: dict[str, Any]) -> None:
        from edgeml.fleet.metrics import quantile
        from edgeml.fleet.metrics import Histogram

        window = float(desired.get("health_window_s", self.config.health_window_s))
        end = time.monotonic() + window
        probes = errors = 0
        hist = Histogram()
        last_error = None
        while True:
            try:
                hist.observe(self.serving.probe())
            except Exception as exc:  # noqa: BLE001 - any failure of the new model counts
                errors += 1
                last_error = f"{type(exc).__name__}: {exc}"
            probes += 1
            with self._lock:
                if self._wanted is not None and self._wanted["seq"] > desired["seq"]:
                    raise Superseded(f"superseded by deployment {self._wanted['deployment_id']}")
            if self._stop.is_set():
                raise Interrupted()
            if time.monotonic() >= end:
                break
            self._stop.wait(self.config.health_probe_s)
        rate = errors / max(probes, 1)
        if rate > self.config.health_max_error_rate:
            raise InstallFailed(f"health window: {errors}/{probes} probes failed (last: {last_error})",
                                FailureCode.HEALTH, after_swap=True)
        p95 = quantile(hist.cumulative(), 0.95)
        if self.config.health_max_p95_ms is not None and p95 is not None and p95 > self.config.health_max_p95_ms:
            raise InstallFailed(f"health window: p95 {p95} ms over {self.config.health_max_p95_ms} ms",
                                FailureCode.HEALTH, after_swap=True)
