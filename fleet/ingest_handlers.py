"""Device messages in: the manager's handlers for presence, heartbeats, install events and telemetry.

A mixin of ``Manager`` (fleet/manager.py): every message is validated at the edge (fleet/protocol.py) and applied
in a transaction; one device's odd or hostile message is refused or dropped and logged, never raised into the
loop. State it shares with the rollout engine is declared below and set up by ``Manager.__init__``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Callable

from edgeml.errors import MessageRejected
from edgeml.fleet import protocol as P
from edgeml.fleet.db import FleetDB
from edgeml.fleet.ratelimit import RateLimitedLog
from edgeml.fleet.states import FINAL_FAILURES, DeviceStatus, FailureCode, InstallState

log = logging.getLogger("edgeml.fleet.manager")   # the manager's logger: operators filter on this name


_UPSERT_SQL: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}   # _touch_device's statement per shape


def _device_upsert(plain: tuple[str, ...], guarded: tuple[str, ...]) -> str:
    """``_touch_device``'s statement: ``plain`` columns always written, ``guarded`` ones only when the message's
    committed_seq is not older than the stored one (or is -1)."""
    newer = "(excluded.committed_seq >= devices.committed_seq OR excluded.committed_seq = -1)"
    updates = [f"{k} = excluded.{k}" for k in plain]
    updates += [f"{k} = CASE WHEN {newer} THEN excluded.{k} ELSE devices.{k} END" for k in guarded
                if k != "committed_seq"]
    if "committed_seq" in guarded:   # last: every CASE above reads the stored (old) row anyway
        updates.append(f"committed_seq = CASE WHEN {newer} THEN excluded.committed_seq ELSE devices.committed_seq END")
    cols = ["device_id", "first_seen", *dict.fromkeys((*plain, *guarded))]
    if "labels" not in cols:
        cols.append("labels")
        updates.append("labels = devices.labels")
    return (f"INSERT INTO devices ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f" ON CONFLICT (device_id) DO UPDATE SET {', '.join(updates)}")


def _failure_status(code: str | None) -> DeviceStatus:
    """A device's failed / rolled_back report: replaced by a newer desired state (e.g. this rollout's rollback)
    is not a failure. Decided by the protocol's ``code``, never by the wording of ``reason``."""
    return DeviceStatus.SUPERSEDED if code == FailureCode.SUPERSEDED else DeviceStatus.FAILED


class IngestHandlers:
    """``on_message`` / ``on_messages`` and the per-kind handlers they dispatch to (``_handlers``)."""

    db: FleetDB
    clock: Callable[[], float]
    rejected: list[str]                               # the newest refused messages, for status pages and tests
    _log: RateLimitedLog
    _changes: int                                     # bumped when a device appears or relabels (late joiners)
    _handlers: dict[str, Callable[[dict[str, Any]], None]]
    _labels: dict[str, str]
    _settled: OrderedDict[str, str]
    _presence_ts: dict[str, float]

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One device's message: validated at the edge; whatever it holds, it cannot raise out of here."""
        checked = self._validated(topic, payload)
        if checked is not None:
            self._apply_logged(topic, *checked)

    def on_messages(self, batch: list[tuple[str, bytes]]) -> None:
        """A batch of device messages (fleet/ingest.py) applied in ONE transaction: one commit per batch, not per
        message. Sorted by device (stable: each device's messages keep their order), so replicas writing the same
        rows take their locks in one order. If anything in the batch fails, it is rolled back and replayed one
        message per transaction, so one bad message costs only itself."""
        checked = [(t, *c) for t, p in batch if (c := self._validated(t, p)) is not None]
        checked.sort(key=lambda item: item[2]["device_id"])
        try:
            with self.db.pipeline(), self.db.tx():     # PostgreSQL: writes sent without a round trip each
                for _topic, kind, msg in checked:
                    self._handlers[kind](msg)
        except Exception:  # noqa: BLE001 - replayed one by one below, where the culprit is logged
            self._settled.clear()     # it may hold statuses of the rolled-back batch
            for topic, kind, msg in checked:
                self._apply_logged(topic, kind, msg)

    def _validated(self, topic: str, payload: bytes) -> tuple[str, dict[str, Any]] | None:
        try:
            _, kind, msg = P.validate(topic, payload)
        except MessageRejected as exc:
            self.rejected = (self.rejected + [f"{topic}: {exc.message}"[:500]])[-50:]
            self._log.warning(topic, "refused message on %s: %s", topic, exc.message[:500])
            return None
        return None if kind == "desired" else (kind, msg)   # desired: our own retained messages

    def _apply_logged(self, topic: str, kind: str, msg: dict[str, Any]) -> None:
        try:
            with self.db.tx():
                self._handlers[kind](msg)
        except Exception as exc:  # noqa: BLE001 - a bug or odd data of one device must not stop the others
            self._log.error(topic, "dropped message on %s: %s: %s", topic, type(exc).__name__, str(exc)[:300])

    def _touch_device(self, msg: dict[str, Any], *, online: bool | None = None, guarded: dict[str, Any] | None = None,
                      **fields: Any) -> None:
        """One upsert per message. ``guarded`` columns are written only when the message's ``committed_seq`` is
        not older than the stored one (or is -1: a fresh state dir), decided by the database in the same
        statement, so no read comes first."""
        now = self.clock()
        sets: dict[str, Any] = {"last_seen": now}
        if "labels" in msg:
            sets["labels"] = labels = json.dumps(msg["labels"], sort_keys=True)
            if self._labels.get(msg["device_id"]) != labels:
                self._labels[msg["device_id"]] = labels
                self._changes += 1
        elif msg["device_id"] not in self._labels:
            self._changes += 1
        if online is not None:
            sets["online"] = int(online)
        sets.update(fields)
        key = (tuple(sets), tuple(guarded or ()))
        if guarded:
            sets.update(guarded)
        values = [msg["device_id"], now, *sets.values()]
        if "labels" not in sets:
            values.append("{}")
        sql = _UPSERT_SQL.get(key)
        if sql is None:      # a handful of shapes: each statement is built once, not per message
            sql = _device_upsert(*key)
            if len(_UPSERT_SQL) < 256:
                _UPSERT_SQL[key] = sql
        self.db.x(sql, values)

    def _on_presence(self, msg: dict[str, Any]) -> None:
        # a restarted broker replays retained presence (Last Wills included) on every reconnect: one not newer
        # than what this manager applied is a replay -- no second "offline" log, no flip of a live device
        seen = self._presence_ts.get(msg["device_id"])
        if seen is not None and msg["ts"] <= seen:
            return
        self._presence_ts[msg["device_id"]] = msg["ts"]
        extra: dict[str, Any] = {}
        active = msg.get("active")
        if msg["online"] and "active" in msg and (active or {}).get("seq", -1) >= self._known_seq(msg["device_id"]):
            extra["active"] = json.dumps(active) if active else None
        if "agent_version" in msg:
            extra["agent_version"] = msg["agent_version"]
        if msg["online"]:
            extra["endpoint"] = msg.get("endpoint")
        self._touch_device(msg, online=msg["online"], **extra)
        if not msg["online"]:
            log.info("device %s offline (%s)", msg["device_id"], msg.get("reason"))

    def _known_seq(self, device_id: str) -> int:
        row = self.db.one("SELECT committed_seq FROM devices WHERE device_id = ?", (device_id,))
        return row["committed_seq"] if row else -1

    def _on_heartbeat(self, msg: dict[str, Any]) -> None:
        # a heartbeat taken just before a commit can arrive after the commit event: never go backwards
        # (committed_seq -1 = a device with a fresh state dir: believe it) -- decided inside the upsert
        guarded = {"state": msg["state"], "committed_seq": msg["committed_seq"],
                   "active": json.dumps(msg["active"]) if msg["active"] else None,
                   "last_failed": json.dumps(msg["last_failed"]) if msg.get("last_failed") else None}
        self._touch_device(msg, online=True, guarded=guarded, refused=msg.get("refused", 0))
        # reconcile from the heartbeat too: events can be lost while the manager or broker is away
        active = msg["active"]
        if active and active.get("deployment_id"):
            self._apply_status(active["deployment_id"], "committed", None)
        lf = msg.get("last_failed")
        if lf and lf.get("deployment_id"):
            self._apply_status(lf["deployment_id"], _failure_status(lf.get("code")), lf.get("reason"))

    def _on_event(self, msg: dict[str, Any]) -> None:
        cur = self.db.x("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                        (msg["device_id"], msg["event_seq"], msg["deployment_id"], msg["deploy_seq"], msg["attempt"],
                         msg["state"], msg.get("reason"), msg["ts"], self.clock()))
        if cur.rowcount == 0:
            return   # redelivered QoS 1 duplicate: already applied
        state = InstallState(msg["state"])
        if state in (InstallState.NOT_SERVING, InstallState.SERVING):   # about the committed model, not an install
            self._touch_device(msg, online=True, state=state.value if state is InstallState.NOT_SERVING else "idle")
            log.warning("device %s: %s %s", msg["device_id"], state.value, msg.get("reason") or "")
            return
        status = (DeviceStatus.COMMITTED if state is InstallState.COMMITTED
                  else _failure_status(msg.get("code")) if state in FINAL_FAILURES else DeviceStatus.INSTALLING)
        self._apply_status(msg["deployment_id"], status, msg.get("reason"), event_seq=msg["event_seq"])
        fields: dict[str, Any] = {"state": state.value if status == DeviceStatus.INSTALLING else "idle"}
        if status == "committed" and msg["deploy_seq"] >= self._known_seq(msg["device_id"]):
            fields["active"] = json.dumps(msg.get("active")) if msg.get("active") else None
            fields["committed_seq"] = msg["deploy_seq"]
        self._touch_device(msg, online=True, **fields)

    def _apply_status(self, deployment_id: str, status: str, reason: str | None, event_seq: int | None = None) -> None:
        known = self._settled.get(deployment_id)
        if event_seq is None and known == status:
            return   # a heartbeat repeating what is applied already: no read, no write
        if status == DeviceStatus.INSTALLING and known is not None and known != DeviceStatus.SENT:
            # the install's later steps (verifying, staged, selftest, swapped, health): the row is installing or
            # final already, and a deployment never returns to "sent", so the read below would change nothing.
            # Six of an install's seven events took a SELECT each (profile in docs/scale.md).
            return
        now = self.clock()
        with self.db.tx() as db:
            dep = db.conn.execute("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,)).fetchone()
            if dep is None:
                return
            if event_seq is not None and event_seq <= dep["last_event_seq"]:
                return   # older than what we applied
            if dep["status"] in ("committed", "failed", "superseded") and status == "installing":
                return   # a late "installing" never undoes a final state
            if dep["status"] == status:
                self._remember(deployment_id, status)
                return
            db.conn.execute("UPDATE deployments SET status = ?, reason = COALESCE(?, reason), updated_at = ?,"
                            " last_event_seq = MAX(last_event_seq, ?) WHERE deployment_id = ?",
                            (status, reason, now, event_seq or 0, deployment_id))
            # by primary key (rollout_id, device_id): "WHERE deployment_id = ?" alone scanned every row of the
            # rollout per event -- O(fleet) per message, the quadratic that stalled 10,000-device rollouts
            if dep["kind"] == "install" and dep["rollout_id"]:
                db.conn.execute("UPDATE rollout_devices SET status = ?, reason = COALESCE(?, reason), updated_at = ?"
                                " WHERE rollout_id = ? AND device_id = ? AND deployment_id = ?",
                                (status, reason, now, dep["rollout_id"], dep["device_id"], deployment_id))
            elif dep["kind"] == "rollback" and dep["rollout_id"] and status != "installing":
                db.conn.execute("UPDATE rollout_devices SET rollback_status = ?, updated_at = ?"
                                " WHERE rollout_id = ? AND device_id = ? AND rollback_deployment_id = ?",
                                ({"committed": "done", "failed": "failed"}.get(status, status), now,
                                 dep["rollout_id"], dep["device_id"], deployment_id))
        self._remember(deployment_id, status)
        if status in ("committed", "failed", "superseded"):
            log.info("device %s: deployment %s %s%s", dep["device_id"], deployment_id, status, f" ({reason})" if reason else "")

    def _remember(self, deployment_id: str, status: str) -> None:
        self._settled[deployment_id] = status
        self._settled.move_to_end(deployment_id)
        if len(self._settled) > 200_000:
            self._settled.popitem(last=False)

    def _on_telemetry(self, msg: dict[str, Any]) -> None:
        with self.db.tx() as db:
            for m in msg["models"]:
                db.conn.execute("INSERT OR REPLACE INTO telemetry VALUES (?,?,?,?,?,?,?,?)",
                                (msg["device_id"], m["name"], m["version"], msg["ts"], m["requests"], m["failures"],
                                 json.dumps(m["latency_buckets_ms"]), m["latency_sum_ms"]))
            db.conn.execute("INSERT OR REPLACE INTO device_telemetry VALUES (?,?,?,?,?,?,?)",
                            (msg["device_id"], msg["ts"], msg.get("cpu_percent"), msg.get("memory_mb"),
                             msg.get("throughput_rps"), json.dumps(msg["active"]) if msg["active"] else None,
                             int(bool(msg.get("stubbed")))))
        if msg.get("drift"):    # the agents' sampled input/output sketches (fleet/drift.py)
            from edgeml.fleet.drift import record as record_drift

            record_drift(self.db, msg, self.clock())
        if any("resilience" in m for m in msg["models"]):   # breaker/admission/fallback state (fleet/resilience.py)
            from edgeml.fleet.resilience import record as record_resilience

            record_resilience(self.db, msg)
        if msg.get("experiments"):   # per-arm experiment counters (fleet/experiments.py)
            from edgeml.fleet.experiments import record as record_experiments

            record_experiments(self.db, msg)
        self._touch_device(msg, online=True)
