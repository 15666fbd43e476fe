"""The device agent: reconcile the desired deployment, safely.

    received -> downloading -> verifying -> staged -> selftest -> swapped -> health -> committed
                 (any failure before "swapped": stay on the committed slot, report failed + reason)
                 (any failure at/after "swapped": re-activate the committed slot, report rolled_back)

``AgentCore`` holds the logic and talks through a ``Link`` (``publish(topic,
payload, qos, retain)``) so it runs over one MQTT connection per device (the
real agent, ``run_agent``) or many devices over one connection (simulator).
Every step is journaled atomically before it is taken; on restart the agent
activates the committed slot first, then resumes the in-flight install (the
download continues from its ``.part`` file) with ``attempt + 1``, and gives up
with a failed report after ``max_attempts``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from edgeml.errors import EdgemlError, MessageRejected
from edgeml.fleet import protocol as P
from edgeml.fleet.install_checks import InstallChecks, InstallFailed, Interrupted, Superseded
from edgeml.fleet.serving import Serving
from edgeml.fleet.slots import Journal, Slots, slot_problem
from edgeml.fleet.states import FailureCode, InstallState
from edgeml.fleet.store import download

log = logging.getLogger("edgeml.fleet.agent")
AGENT_VERSION = "0.1.0"


class Link(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool: ...


@dataclass
class AgentConfig:
    device_id: str
    state_dir: Path
    labels: dict[str, str] = field(default_factory=dict)
    trusted_keys: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    heartbeat_s: float = 10.0
    telemetry_s: float = 10.0
    health_window_s: float = 10.0          # used when the desired message does not say
    health_probe_s: float = 0.25
    health_max_error_rate: float = 0.0
    health_max_p95_ms: float | None = None
    max_attempts: int = 3
    download_patience_s: float = 300.0      # keep retrying a download that fails for network reasons
    check_host: bool = True
    endpoint: str | None = None            # where this device serves (KServe v2), announced in presence

    @property
    def require_signed(self) -> bool:
        return bool(self.trusted_keys) and not self.allow_unsigned


class AgentCore(InstallChecks):
    def __init__(self, config: AgentConfig, link: Link, serving: Serving, *,
                 clock: Callable[[], float] = time.time, downloader=download):
        self.config = config
        self.link = link
        self.serving = serving
        self.clock = clock
        self.downloader = downloader
        P.check_device_id(config.device_id)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state_dir)
        self.slots = Slots(self.state_dir)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._wanted: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.state = "idle"
        self.refused = 0
        self.refusals: list[str] = []
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._req_mark: tuple[float, int] | None = None
        self._serving_ok = True
        from edgeml.fleet.arms import ExperimentRunner   # challenger beside the champion (fleet/experiments.py)

        self.experiments = ExperimentRunner(config.device_id, self.state_dir, serving, config.trusted_keys,
                                            config.require_signed)

    # ------------------------------------------------------------------ lifecycle
    def restore(self) -> None:
        """Serve the committed slot (re-verified), then queue any interrupted install (resume or give up)."""
        self._restore_slot()
        j = self.journal.data
        pending = j["pending"]
        if pending:
            attempt = pending["attempt"] + 1
            desired = pending["desired"]
            if attempt > self.config.max_attempts:
                log.error("deployment %s: giving up after %d attempts", desired["deployment_id"], pending["attempt"])
                self._finish_failed(desired, pending["attempt"],
                                    f"gave up after {pending['attempt']} attempts (agent restarted during '{pending['state']}')",
                                    state="failed", code=FailureCode.GAVE_UP)
            else:
                log.warning("resuming deployment %s interrupted in '%s' (attempt %d)",
                            desired["deployment_id"], pending["state"], attempt)
                with self._lock:
                    self._wanted = dict(desired, _attempt=attempt)

    def _restore_slot(self) -> None:
        """Re-verify the committed slot before serving it (sha256 against the journal, and the signature when
        trusted keys are configured): a file swapped while the agent was down is refused and reported, and
        the previous good slot is served instead, or nothing."""
        j = self.journal.data
        for which in ("committed", "previous"):
            rec = j[which]
            if not rec:
                continue
            if not rec.get("slot"):          # a committed "serve nothing"
                break
            problem = slot_problem(rec, self.config.trusted_keys, self.config.require_signed)
            if problem is None:
                try:
                    self.serving.activate(Path(rec["slot"]), rec["name"], rec["version"])
                except (EdgemlError, OSError) as exc:
                    problem = f"cannot be served: {getattr(exc, 'message', None) or exc}"
            if problem is None:
                log.info("serving %s %s %s (seq %s)", which, rec["name"], rec["version"], rec["seq"])
                if which == "previous":
                    with self._lock:
                        j["committed"], j["previous"] = rec, None
                        self.journal.save()
                return
            self._refuse_slot(which, rec, problem)
        with self._lock:    # nothing verifiable left: serve nothing, and say so (active: null)
            if j["committed"] and j["committed"].get("slot"):
                j["committed"] = None
                self.journal.save()

    def _refuse_slot(self, which: str, rec: dict[str, Any], problem: str) -> None:
        log.error("refusing the %s slot %s@%s: %s", which, rec.get("name"), rec.get("version"), problem)
        with self._lock:
            j = self.journal.data
            if which == "committed":
                j["committed"] = None
            else:
                j["previous"] = None
            j["last_failed"] = {"deployment_id": rec["deployment_id"], "seq": rec["seq"], "reason": problem,
                                "code": FailureCode.SLOT_INVALID.value, "at": self.clock()}
            ev = self.journal.next_event_seq()
            self.journal.save()
        self._event(_record_as_desired(rec), 1, InstallState.FAILED, problem, seq=ev, code=FailureCode.SLOT_INVALID)

    def check_serving(self) -> None:
        """Is the committed model really answering (the serving side's readiness, e.g. the embedded server's
        ``/ready``, not only our journal)? Report a change as an event + heartbeat state, and try to bring it
        back once by re-activating the (re-verified) committed slot."""
        with self._lock:
            c = self.journal.data["committed"]
            if self.state not in (InstallState.IDLE, InstallState.NOT_SERVING) or not c or not c.get("slot"):
                return
        ok = self.serving.ready()
        if ok and self.state == InstallState.NOT_SERVING:
            self.state, self._serving_ok = InstallState.IDLE, True
            self._event(_record_as_desired(c), 1, InstallState.SERVING, "the committed model answers again")
        elif not ok and self.state == InstallState.IDLE:
            self.state, self._serving_ok = InstallState.NOT_SERVING, False
            why = f"{c['name']}@{c['version']} stopped serving on this device"
            log.error("%s; re-activating the committed slot", why)
            self._event(_record_as_desired(c), 1, InstallState.NOT_SERVING, why, code=FailureCode.NOT_READY)
            problem = slot_problem(c, self.config.trusted_keys, self.config.require_signed)
            if problem is None:
                try:
                    self.serving.activate(Path(c["slot"]), c["name"], c["version"])
                except (EdgemlError, OSError) as exc:
                    log.error("re-activation failed: %s", exc)
            else:
                log.error("not re-activating: %s", problem)

    def start(self, threads: bool = True) -> None:
        self.restore()
        if threads:
            for target, name in ((self._worker, "install"), (self._ticker, "heartbeat")):
                t = threading.Thread(target=target, name=f"agent-{name}-{self.config.device_id}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(5)

    # ------------------------------------------------------------------ messages
    def on_connect(self) -> None:
        self.publish_presence(True)
        self.publish_heartbeat()

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        try:
            from edgeml.fleet.experiments import topic as experiment_topic

            if topic == experiment_topic(self.config.device_id):
                return self.experiments.on_message(payload)
            if topic != P.topic(self.config.device_id, "desired"):
                log.debug("ignoring a message on %s (not subscribed here; amqtt over-delivers retained messages)", topic)
                return
            device_id, kind, msg = P.validate(topic, payload)
            P.verify(msg, self.config.trusted_keys, required=self.config.require_signed, where=f"desired on {topic}")
            self.accept(msg)
        except MessageRejected as exc:
            self._refuse(topic, exc.message)

    def _refuse(self, topic: str, reason: str) -> None:
        self.refused += 1
        self.refusals = (self.refusals + [reason])[-20:]
        log.warning("refused message on %s: %s", topic, reason)

    def accept(self, desired: dict[str, Any]) -> None:
        """Replay protection + idempotence; queue the newest acceptable desired state."""
        with self._lock:
            j = self.journal.data
            seq, dep = desired["seq"], desired["deployment_id"]
            committed, pending = j["committed"], j["pending"]
            if committed and committed["seq"] == seq and committed["deployment_id"] == dep:
                return   # redelivery of what is already committed
            if pending and pending["desired"]["seq"] == seq and pending["desired"]["deployment_id"] == dep:
                return   # already installing it
            if self._wanted and self._wanted["seq"] == seq and self._wanted["deployment_id"] == dep:
                return
            failed = j["last_failed"]
            if failed and failed["seq"] == seq and failed["deployment_id"] == dep:
                return   # already failed and reported; the manager decides what next
            if seq <= j["highest_seq"] or (self._wanted is not None and seq < self._wanted["seq"]):
                raise MessageRejected(
                    f"replayed or stale desired state: seq {seq} is not newer than"
                    f" {max(j['highest_seq'], self._wanted['seq'] if self._wanted else -1)} (deployment {dep})")
            dropped, self._wanted = self._wanted, dict(desired, _attempt=1)
            self._wake.notify_all()
        if dropped is not None:   # queued but never started: tell the manager it will not happen
            self._event(dropped, dropped.get("_attempt", 1), "failed", f"superseded by deployment {dep}",
                        code=FailureCode.SUPERSEDED)

    # ------------------------------------------------------------------ publishing
    def _publish(self, kind: str, msg: dict[str, Any], qos: int, retain: bool = False) -> None:
        try:
            self.link.publish(P.topic(self.config.device_id, kind), P.encode(msg), qos, retain)
        except Exception as exc:  # noqa: BLE001 - publishing must never break an install
            log.warning("publish on %s failed: %s", kind, exc)

    def active(self) -> dict[str, Any] | None:
        c = self.journal.data["committed"]
        if not c or not c.get("name"):
            return None
        return {"name": c["name"], "version": c["version"], "seq": c["seq"], "deployment_id": c["deployment_id"],
                "sha256": c.get("sha256")}

    def presence_message(self, online: bool) -> dict[str, Any]:
        return P.presence(self.config.device_id, online, labels=self.config.labels,
                          active=self.active() if online else None, agent_version=AGENT_VERSION,
                          serving=self._serving_ok if online else None,
                          reason=None if online else "connection lost (Last Will)",
                          endpoint=self.config.endpoint if online else None)

    def publish_presence(self, online: bool) -> None:
        with self._lock:
            msg = self.presence_message(online)
            if not online:
                msg["reason"] = "agent stopped"
            self._publish("presence", msg, 1, retain=True)

    def publish_heartbeat(self) -> None:
        with self._lock:   # snapshot + publish atomically w.r.t. journal updates and their events
            self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        j = self.journal.data
        pending = j["pending"]
        msg = {"schema_version": P.SCHEMA_VERSION, "type": "heartbeat", "device_id": self.config.device_id,
               "ts": self.clock(), "labels": self.config.labels, "state": self.state, "active": self.active(),
               "committed_seq": j["committed"]["seq"] if j["committed"] else -1,
               "deployment_id": pending["desired"]["deployment_id"] if pending else None,
               "interval_s": self.config.heartbeat_s, "refused": self.refused,
               "last_failed": _failure_summary(j["last_failed"]), "serving": self._serving_ok}
        self._publish("heartbeat", msg, 0)

    def telemetry_message(self) -> dict[str, Any]:
        from edgeml.runtime.model import resident_memory_mb

        now_m, now_cpu = time.monotonic(), time.process_time()
        last_m, last_cpu = self._cpu_mark
        self._cpu_mark = (now_m, now_cpu)
        interval = max(now_m - last_m, 1e-6)
        models = self.serving.stats()
        total = sum(m["requests"] for m in models)
        rps = 0.0
        if self._req_mark is not None:
            rps = max(0, total - self._req_mark[1]) / max(now_m - self._req_mark[0], 1e-6)
        self._req_mark = (now_m, total)
        msg = {"schema_version": P.SCHEMA_VERSION, "type": "telemetry", "device_id": self.config.device_id,
               "ts": self.clock(), "interval_s": round(interval, 3),
               "models": [{k: v for k, v in m.items() if k in P.MODEL_FIELDS or k == "resilience"} for m in models],
               "active": self.active(), "cpu_percent": round(100.0 * (now_cpu - last_cpu) / interval, 2),
               "memory_mb": round(resident_memory_mb(), 1), "throughput_rps": round(rps, 3)}
        if getattr(self.serving, "stubbed", False):
            msg["stubbed"] = True
        drift_windows = getattr(self.serving, "drift_windows", None)   # sampled inputs/outputs (runtime/drift.py)
        if drift_windows is not None and (rows := drift_windows()):
            msg["drift"] = rows
        if exp_rows := self.experiments.rows():     # running experiment's per-arm counters (fleet/arms.py)
            msg["experiments"] = exp_rows
        return msg

    def publish_telemetry(self) -> None:
        self._publish("telemetry", self.telemetry_message(), 0)

    def _event(self, desired: dict[str, Any], attempt: int, state: str, reason: str | None = None,
               seq: int | None = None, code: FailureCode | None = None) -> None:
        """Publish an install event. ``seq`` was reserved in the caller's journal write (one fsync, not two)."""
        art = desired.get("artifact") or {}
        if seq is None:
            with self._lock:
                seq = self.journal.next_event_seq()
                self.journal.save()
        msg = {"schema_version": P.SCHEMA_VERSION, "type": "event", "device_id": self.config.device_id,
               "ts": self.clock(), "event_seq": seq, "deployment_id": desired["deployment_id"],
               "deploy_seq": desired["seq"], "attempt": attempt, "state": state,
               "rollout_id": desired.get("rollout_id"), "name": art.get("name"), "version": art.get("version"),
               "reason": reason, "code": code.value if code else None, "active": self.active()}
        log.info("%s: deployment %s %s%s", self.config.device_id, desired["deployment_id"], state,
                 f" ({reason})" if reason else "")
        self._publish("events", msg, 1)

    # ------------------------------------------------------------------ threads
    def _ticker(self) -> None:
        next_hb = next_tel = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_hb:
                self.check_serving()
                self.publish_heartbeat()
                next_hb = now + self.config.heartbeat_s
            if now >= next_tel:
                self.publish_telemetry()
                next_tel = now + self.config.telemetry_s
            self._stop.wait(min(next_hb, next_tel) - time.monotonic())

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while self._wanted is None and not self._stop.is_set():
                    self._wake.wait(1.0)
                if self._stop.is_set():
                    return
                desired, self._wanted = self._wanted, None
            if desired is not None:
                self.install(desired)

    def step_pending(self) -> bool:
        """Run one queued install synchronously (simulator / tests). True when one ran."""
        with self._lock:
            desired, self._wanted = self._wanted, None
        if desired is None:
            return False
        self.install(desired)
        return True

    # ------------------------------------------------------------------ the install
    def _journal_state(self, desired: dict[str, Any], attempt: int, state: str, **extra) -> None:
        with self._lock:
            if self._wanted is not None and self._wanted["seq"] > desired["seq"] and state not in ("received",):
                raise Superseded(f"superseded by deployment {self._wanted['deployment_id']}")
            j = self.journal.data
            pending = j["pending"] or {}
            j["pending"] = {"desired": desired, "attempt": attempt, "state": state, **{k: pending.get(k) for k in ("slot",)}, **extra}
            j["highest_seq"] = max(j["highest_seq"], desired["seq"])
            ev = self.journal.next_event_seq()
            self.journal.save()
            self.state = state
            self._event(desired, attempt, state, seq=ev)   # under the lock: a heartbeat never overtakes it

    def install(self, desired: dict[str, Any]) -> None:
        attempt = int(desired.pop("_attempt", 1))
        swapped = False
        stale = self.journal.data["pending"]
        if stale and stale["desired"]["deployment_id"] != desired["deployment_id"]:
            # an install interrupted by a restart, replaced by a newer desired state meanwhile
            self._event(stale["desired"], stale["attempt"], "failed",
                        f"superseded by deployment {desired['deployment_id']}", code=FailureCode.SUPERSEDED)
        try:
            self._journal_state(desired, attempt, "received")
            art = desired["artifact"]
            committed = self.journal.data["committed"]
            if art is None:   # desired: serve nothing
                self.serving.deactivate()
                self._commit(desired, attempt, slot=None)
                return
            if committed and committed.get("sha256") == art["sha256"] and committed.get("slot"):
                # already serving exactly this artifact (e.g. a rollback to where we are): just record it
                self._commit(desired, attempt, slot=committed["slot"])
                return
            path = self._stage_artifact(desired, attempt)
            self._journal_state(desired, attempt, "verifying", slot=str(path))
            self._verify(path, art)
            self._journal_state(desired, attempt, "staged", slot=str(path))
            self._journal_state(desired, attempt, "selftest", slot=str(path))
            result = self.serving.selftest(path, trusted_keys=self.config.trusted_keys,
                                           require_signature=self.config.require_signed)
            if not result.passed:
                raise InstallFailed(f"self-test failed: {result.reason}", FailureCode.SELFTEST)
            self._journal_state(desired, attempt, "swapped", slot=str(path))
            swapped = True
            try:
                self.serving.activate(path, art["name"], art["version"])
            except (EdgemlError, OSError) as exc:
                raise InstallFailed(f"hot swap failed: {exc}", FailureCode.SWAP, after_swap=True) from None
            self._journal_state(desired, attempt, "health", slot=str(path))
            self._health_window(desired)
            self._commit(desired, attempt, slot=str(path))
        except Interrupted:
            log.warning("stopping in the middle of deployment %s; it resumes at the next start",
                        desired["deployment_id"])
        except Superseded as exc:
            self._rollback_serving() if swapped else None
            self._finish_failed(desired, attempt, str(exc), state="rolled_back" if swapped else "failed",
                                code=exc.code)
        except InstallFailed as exc:
            if swapped or exc.after_swap:
                self._rollback_serving()
            self._finish_failed(desired, attempt, exc.reason, state="rolled_back" if swapped else "failed",
                                code=exc.code)
        except (EdgemlError, OSError) as exc:
            if swapped:
                self._rollback_serving()
            self._finish_failed(desired, attempt, getattr(exc, "message", None) or str(exc),
                                state="rolled_back" if swapped else "failed", code=FailureCode.ERROR)

    def _rollback_serving(self) -> None:
        c = self.journal.data["committed"]
        try:
            if c and c.get("slot"):
                self.serving.activate(Path(c["slot"]), c["name"], c["version"])
            else:
                self.serving.deactivate()
        except (EdgemlError, OSError) as exc:
            log.error("could not re-activate the committed slot: %s", exc)

    def _commit(self, desired: dict[str, Any], attempt: int, slot: str | None) -> None:
        art = desired["artifact"] or {}
        with self._lock:
            j = self.journal.data
            record = {"deployment_id": desired["deployment_id"], "seq": desired["seq"],
                      "rollout_id": desired.get("rollout_id"), "name": art.get("name"), "version": art.get("version"),
                      "sha256": art.get("sha256"), "slot": slot, "committed_at": self.clock()}
            old = j["committed"]
            if old and old.get("sha256") != record["sha256"]:
                j["previous"] = old
            j["committed"] = record
            j["pending"] = None
            j["highest_seq"] = max(j["highest_seq"], desired["seq"])
            ev = self.journal.next_event_seq()
            self.journal.save()
            self.state = "idle"
            keep = [Path(r["slot"]).parent for r in (j["committed"], j["previous"]) if r and r.get("slot")]
            self._event(desired, attempt, "committed", seq=ev)
        self.slots.gc(keep)
        self.publish_presence(True)
        self.publish_heartbeat()

    def _finish_failed(self, desired: dict[str, Any], attempt: int, reason: str, *, state: str,
                       code: FailureCode) -> None:
        with self._lock:
            j = self.journal.data
            j["pending"] = None
            j["last_failed"] = {"deployment_id": desired["deployment_id"], "seq": desired["seq"], "reason": reason,
                                "code": code.value, "at": self.clock()}
            j["highest_seq"] = max(j["highest_seq"], desired["seq"])
            ev = self.journal.next_event_seq()
            self.journal.save()
            self.state = "idle"
            self._event(desired, attempt, state, reason, seq=ev, code=code)
        self.publish_heartbeat()


class _NotConnected:
    """The link before the MQTT transport exists (construction order): nothing is published through it."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        return False


def _failure_summary(last_failed: dict[str, Any] | None) -> dict[str, Any] | None:
    if not last_failed:
        return None
    return {"deployment_id": last_failed["deployment_id"], "seq": last_failed["seq"],
            "reason": last_failed.get("reason"), "code": last_failed.get("code")}


def _record_as_desired(rec: dict[str, Any]) -> dict[str, Any]:
    """A journal deployment record in the shape ``_event`` reads (events about the committed model)."""
    return {"deployment_id": rec["deployment_id"], "seq": rec["seq"], "rollout_id": rec.get("rollout_id"),
            "artifact": {"name": rec.get("name"), "version": rec.get("version")}}


def new_deployment_id() -> str:
    return uuid.uuid4().hex[:16]


class Agent:
    """One device: AgentCore + its own MQTT connection (birth + Last Will) + embedded serving."""

    def __init__(self, config: AgentConfig, broker, serving: Serving):
        from edgeml.fleet.transport import MqttTransport

        self.core = AgentCore(config, link=_NotConnected(), serving=serving)  # the transport is set below
        will = P.encode(self.core.presence_message(False))
        self.transport = MqttTransport(broker, client_id=f"edgeml-agent-{config.device_id}",
                                       will=(P.topic(config.device_id, "presence"), will, 1, True),
                                       on_message=self.core.on_message, on_connect=self.core.on_connect)
        self.core.link = self.transport
        self.transport.subscribe(P.topic(config.device_id, "desired"), 1)
        from edgeml.fleet.experiments import topic as experiment_topic

        self.transport.subscribe(experiment_topic(config.device_id), 1)

    def start(self) -> "Agent":
        self.core.start()
        self.transport.start()
        return self

    def stop(self) -> None:
        self.core.publish_presence(False)
        self.core.stop()
        time.sleep(0.1)
        self.transport.stop()
        self.core.experiments.close()
        self.core.serving.close()
