"""The fleet manager: device registry, rollouts in waves, gates, rollback, audit.

All state lives in SQLite (fleet/db.py), so a restarted manager continues a
rollout where it was. ``Manager`` takes a ``link`` (anything with
``publish``) and a ``clock``; ``tick()`` does one round of work (commands from
the CLI, device expiry, every active rollout), so tests drive waves and bake
times with a fake clock and no sleeps.

Rollout states: running -> (paused <-> running) -> completed
                running/paused -> aborted            (by hand: stop, leave devices where they are)
                any -> rolling_back -> rolled_back   (gate breach or by hand: every updated device
                                                      gets its previous artifact back)
Per-device status in a rollout: pending -> sent -> installing -> committed | failed | timeout
                                (| superseded: a newer desired state, e.g. the rollback, replaced it)
Late joiners (registered or relabelled after a start) join a rollout's last wave: ``_enroll_late_devices``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeml.errors import EdgemlError, FleetError, UsageError
from edgeml.fleet import protocol as P
from edgeml.fleet.db import FleetDB, row_dict
from edgeml.fleet.gates import GateContext, VersionStats, build_gates, evaluate_all, gate_from_dict, gate_to_dict
from edgeml.fleet.ingest_handlers import IngestHandlers
from edgeml.fleet.metrics import merge, stored_buckets
from edgeml.fleet.ratelimit import RateLimitedLog
from edgeml.fleet.states import DeviceStatus, RolloutState
from edgeml.fleet.store import ArtifactStore
from edgeml.fleet.waves import Wave, assign_waves, wave_label

log = logging.getLogger("edgeml.fleet.manager")
ACTIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)
INFLIGHT = (DeviceStatus.SENT, DeviceStatus.INSTALLING)
FAILED = (DeviceStatus.FAILED, DeviceStatus.TIMEOUT)
JOINABLE = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED)   # rollouts that take in late joiners


@dataclass
class ManagerConfig:
    db: Path | str                        # an SQLite file or a postgresql:// URL (fleet/db_postgres.py)
    store_dir: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8765
    public_url: str | None = None
    heartbeat_timeout_s: float = 30.0
    offline_timeout_s: float = 300.0     # an offline device in a wave is pending until this, then "timeout"
    install_timeout_s: float = 900.0     # an online device that never finishes installing
    health_window_s: float = 10.0        # sent to agents in each desired message
    resend_after_s: float = 15.0         # an online device silent about a desired state this long gets it again
    sign_key: Path | None = None
    tick_s: float = 0.5

    def store_path(self) -> Path:
        if self.store_dir:
            return Path(self.store_dir)
        if str(self.db).startswith(("postgresql://", "postgres://")):
            return Path("fleet-store")    # replicas: pass --store on a volume they share
        return Path(self.db).with_name(Path(self.db).stem + "-store")


class Manager(IngestHandlers):
    """Rollouts, the CLI's commands and the desired states out; device messages in: ``IngestHandlers``."""

    def __init__(self, config: ManagerConfig, link=None, *, clock: Callable[[], float] = time.time,
                 artifact_base_url: str | None = None):
        self.config = config
        self.db = FleetDB(config.db)
        self.store = ArtifactStore(config.store_path())
        self.link = link
        self.clock = clock
        self.base_url = (artifact_base_url or config.public_url or
                         f"http://{config.http_host}:{config.http_port}").rstrip("/")
        self.rejected: list[str] = []
        self._next_resend = 0.0
        self._log = RateLimitedLog(log)
        self._changes, self._changes_done = 1, 0   # bumped when a device appears/relabels or a rollout changes state
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "presence": self._on_presence, "heartbeat": self._on_heartbeat, "events": self._on_event,
            "telemetry": self._on_telemetry}
        self._held: list[tuple[str, bytes]] | None = None   # desired messages waiting for their commit
        self._labels: dict[str, str] = {}          # device -> labels last seen here: a change wakes late joining
        self._settled: OrderedDict[str, str] = OrderedDict()   # deployment -> status known applied (bounded)
        self._presence_ts: dict[str, float] = {}    # device -> newest presence applied: replays are dropped

    # ================================================================ messages in (on_message: fleet/ingest_handlers.py)
    def on_connect(self) -> None:
        """(Re)publish every device's last desired state: harmless if the broker kept it (agents ignore seen seqs)."""
        for row in self.db.q("SELECT device_id, payload FROM desired"):
            self._publish(P.topic(row["device_id"], "desired"), bytes(row["payload"]))

    # ================================================================ desired out
    def _publish(self, topic: str, payload: bytes) -> None:
        if self.link is not None:
            self.link.publish(topic, payload, 1, True)

    def _artifact_msg(self, sha256: str | None) -> dict[str, Any] | None:
        if sha256 is None:
            return None
        row = self.db.one("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,))
        if row is None:
            raise FleetError(f"artifact {sha256[:16]} is not in the store")
        return {"name": row["name"], "version": row["version"], "url": f"{self.base_url}/artifacts/{sha256}",
                "sha256": sha256, "size": row["size"]}

    def send_desired(self, device_id: str, *, rollout_id: str | None, kind: str, sha256: str | None,
                     health_window_s: float | None = None, record=None) -> tuple[str, int]:
        """Record the deployment (and, via ``record(conn, deployment_id, seq)``, the caller's rows) in one
        transaction, then publish: an agent's answer can never arrive before the rows it updates."""
        seq = self.db.next_seq()
        dep = uuid.uuid4().hex[:16]
        msg = P.desired(device_id, deployment_id=dep, seq=seq, artifact=self._artifact_msg(sha256),
                        rollback=(kind == "rollback"), rollout_id=rollout_id, issued_at=self.clock(),
                        health_window_s=health_window_s if health_window_s is not None else self.config.health_window_s)
        if self.config.sign_key:
            P.sign(msg, self.config.sign_key)
        payload = P.encode(msg)
        now = self.clock()
        with self.db.tx() as db:
            db.conn.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (dep, device_id, seq, rollout_id, kind, sha256, "sent", None, 0, now, now))
            db.conn.execute("INSERT OR REPLACE INTO desired VALUES (?,?,?,?)", (device_id, dep, seq, payload))
            if record is not None:
                record(db.conn, dep, seq)
        if self._held is not None:
            self._held.append((P.topic(device_id, "desired"), payload))
        else:
            self._publish(P.topic(device_id, "desired"), payload)
        return dep, seq

    @contextmanager
    def _sending(self) -> Iterator[None]:
        """Many desired messages in ONE transaction, published only after it commits (an answer can never
        arrive before its rows; a rolled-back batch sends nothing)."""
        self._held = []
        try:
            with self.db.tx():
                yield
            held = self._held
        finally:
            self._held = None
        for topic, payload in held:
            self._publish(topic, payload)

    # ================================================================ API (audited)
    def publish_artifact(self, path: Path, actor: str, trusted_keys: list[Path] | None = None) -> dict[str, Any]:
        rec = self.store.publish(path, trusted_keys=trusted_keys)
        return register_artifact(self.db, rec, actor, self.clock())

    def start_rollout(self, spec: str, *, selector: dict[str, str], waves: list[Wave], max_failure_rate: float,
                      bake_s: float, gates: list[str], actor: str, health_window_s: float | None = None) -> dict:
        name, at, version = spec.partition("@")
        if not at or not name or not version:
            raise UsageError(f"rollout target {spec!r} must be NAME@VERSION")
        art = self.db.one("SELECT * FROM artifacts WHERE name = ? AND version = ?", (name, version))
        if art is None:
            raise FleetError(f"{spec} is not published", hint="edgeml fleet publish ARTIFACT first")
        gate_objs = build_gates(gates, max_failure_rate)
        labels = {r["device_id"]: json.loads(r["labels"]) for r in self.db.q("SELECT device_id, labels FROM devices")}
        devices = sorted(d for d, lab in labels.items() if P.selector_matches(selector, lab))
        if not devices:
            raise FleetError(f"no known device matches the selector {selector or '(all)'}",
                             hint="check edgeml fleet devices; agents register when they first connect")
        busy = self.db.q(f"SELECT DISTINCT rd.device_id, r.id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id"
                         f" WHERE r.state IN ({','.join('?' * len(ACTIVE_STATES))})", ACTIVE_STATES)
        clash = sorted({r["id"] for r in busy if r["device_id"] in set(devices)})
        if clash:
            raise FleetError(f"devices of this selector are in active rollout(s) {clash}",
                             hint="wait for them, or pause/abort them first")
        now = self.clock()
        with self.db.tx() as db:
            rid = str(db.conn.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] + 1)
            db.conn.execute(
                "INSERT INTO rollouts (id, name, version, sha256, selector, waves, max_failure_rate, bake_s, gates, state,"
                " wave, created_at, created_by, updated_at, health_window_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rid, name, version, art["sha256"], json.dumps(selector), json.dumps(waves), max_failure_rate, bake_s,
                 json.dumps([gate_to_dict(g) for g in gate_objs]), "running", 0, now, actor, now, health_window_s))
            for w, ids in enumerate(assign_waves(rid, devices, waves, labels)):
                for d in ids:
                    db.conn.execute("INSERT INTO rollout_devices (rollout_id, device_id, wave, status, updated_at)"
                                    " VALUES (?,?,?,?,?)", (rid, d, w, "pending", now))
        self._changes += 1
        self.db.audit(now, actor, "rollout.start", rid, {"target": spec, "selector": selector, "waves": waves,
                                                          "devices": len(devices), "max_failure_rate": max_failure_rate,
                                                          "bake_s": bake_s, "gates": [g.expression() for g in gate_objs]})
        log.info("rollout %s: %s to %d devices in %d waves (by %s)", rid, spec, len(devices), len(waves), actor)
        return self.rollout_status(rid)

    def _rollout(self, rid: str) -> dict[str, Any]:
        r = row_dict(self.db.one("SELECT * FROM rollouts WHERE id = ?", (str(rid),)),
                     ("selector", "waves", "gates", "gate_results"))
        if r is None:
            raise FleetError(f"no rollout {rid!r}", hint="list them with: edgeml fleet rollout status")
        return r

    def _set_state(self, rid: str, state: str, actor: str, action: str, reason: str | None = None, **detail) -> None:
        now = self.clock()
        self.db.x("UPDATE rollouts SET state = ?, reason = COALESCE(?, reason), updated_at = ? WHERE id = ?",
                  (state, reason, now, rid))
        self.db.audit(now, actor, action, rid, {"state": state, "reason": reason, **detail})
        self._changes += 1     # e.g. devices of a finished rollout may now join a newer one
        log.info("rollout %s: %s -> %s%s", rid, action, state, f" ({reason})" if reason else "")

    def pause(self, rid: str, actor: str) -> dict:
        r = self._rollout(rid)
        if r["state"] != "running":
            raise FleetError(f"rollout {rid} is {r['state']}; only a running rollout can be paused")
        self._set_state(rid, "paused", actor, "rollout.pause")
        return self.rollout_status(rid)

    def resume(self, rid: str, actor: str) -> dict:
        r = self._rollout(rid)
        if r["state"] != "paused":
            raise FleetError(f"rollout {rid} is {r['state']}; only a paused rollout can be resumed")
        self._set_state(rid, "running", actor, "rollout.resume")
        return self.rollout_status(rid)

    def abort(self, rid: str, actor: str, reason: str = "aborted by hand") -> dict:
        r = self._rollout(rid)
        if r["state"] not in ("running", "paused"):
            raise FleetError(f"rollout {rid} is {r['state']}; only a running or paused rollout can be aborted")
        self._set_state(rid, "aborted", actor, "rollout.abort", reason)
        # terminal states for every wave: devices never sent are "skipped" (as in a rollback), not pending forever
        self.db.x("UPDATE rollout_devices SET status = 'skipped', updated_at = ? WHERE rollout_id = ? AND status = 'pending'",
                  (self.clock(), rid))
        return self.rollout_status(rid)

    def rollback(self, rid: str, actor: str, reason: str = "rolled back by hand") -> dict:
        r = self._rollout(rid)
        if r["state"] in ("rolling_back", "rolled_back"):
            raise FleetError(f"rollout {rid} is already {r['state']}")
        self._set_state(rid, "rolling_back", actor, "rollout.rollback", reason)
        return self.rollout_status(rid)

    def took_leadership(self, replica: str) -> None:
        """This replica now drives rollouts (fleet/leader.py): audit the hand-over, and republish every retained
        desired state once -- the old leader may have committed messages it never published."""
        prev = self.db.one("SELECT actor FROM audit WHERE action = 'manager.leader' ORDER BY id DESC LIMIT 1")
        self.db.audit(self.clock(), f"manager:{replica}", "manager.leader", None,
                      {"replica": replica, "previous": prev["actor"] if prev else None})
        log.info("replica %s leads rollouts (previous leader: %s)", replica, prev["actor"] if prev else "none")
        self._changes += 1
        self.on_connect()

    # ================================================================ the loop
    def tick(self) -> None:
        """One round. Each step and each rollout is isolated: one bad record (a device's odd telemetry, a
        hand-edited row) is logged (rate-limited) and skipped; it never stops the other rollouts advancing or
        rolling back."""
        self._guarded("commands", self.process_commands)
        now = self.clock()
        self._guarded("expiry", self._expire_devices, now)
        self._guarded("resend", self._resend_unanswered, now)
        self._guarded("late devices", self._enroll_late_devices, now)
        for row in self.db.q("SELECT id, state FROM rollouts WHERE state IN (?, ?) ORDER BY id",
                             (RolloutState.RUNNING, RolloutState.ROLLING_BACK)):
            step = self._advance if row["state"] == RolloutState.RUNNING else self._advance_rollback
            self._guarded(f"rollout {row['id']}", lambda rid=row["id"], step=step: step(self._rollout(rid), now))
        from edgeml.fleet.experiments import tick as experiments_tick

        self._guarded("experiments", experiments_tick, self)

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except EdgemlError as exc:
            self._log.error(what, "%s: %s", what, exc.message)
        except Exception as exc:  # noqa: BLE001 - see tick()
            self._log.error(what, "%s failed: %s: %s", what, type(exc).__name__, str(exc)[:300])

    def _expire_devices(self, now: float) -> None:
        expired = self.db.x("UPDATE devices SET online = 0 WHERE online = 1 AND last_seen < ?",
                            (now - self.config.heartbeat_timeout_s,)).rowcount
        if expired:
            log.info("%d device(s) missed heartbeats for %.0fs: marked offline", expired, self.config.heartbeat_timeout_s)

    def _resend_unanswered(self, now: float) -> None:
        """Publish the stored desired state again to online devices that never answered it. A broker may accept
        a publish and still lose it (NATS drops retained stores while JetStream re-elects leaders); the agent
        treats a redelivery of the same deployment as a no-op, so resending is always safe."""
        if now < self._next_resend:
            return
        self._next_resend = now + self.config.resend_after_s / 2
        rows = self.db.q("SELECT d.deployment_id, d.device_id, s.payload FROM deployments d"
                         " JOIN desired s ON s.deployment_id = d.deployment_id"
                         " JOIN devices v ON v.device_id = d.device_id"
                         " WHERE d.status = ? AND d.updated_at < ? AND v.online = 1 LIMIT 1000",
                         (DeviceStatus.SENT, now - self.config.resend_after_s))
        for row in rows:
            self.db.x("UPDATE deployments SET updated_at = ? WHERE deployment_id = ? AND status = ?",
                      (now, row["deployment_id"], DeviceStatus.SENT))
            self._publish(P.topic(row["device_id"], "desired"), bytes(row["payload"]))
        if rows:
            log.info("resent %d desired state(s) that online devices never answered", len(rows))

    def _wave_devices(self, rid: str, wave: int, *, pending_only: bool = False) -> list[dict[str, Any]]:
        only = " AND rd.status = 'pending'" if pending_only else ""
        return [dict(r) for r in self.db.q(
            "SELECT rd.*, d.online, d.active FROM rollout_devices rd LEFT JOIN devices d USING (device_id)"
            f" WHERE rd.rollout_id = ? AND rd.wave = ?{only} ORDER BY rd.device_id", (rid, wave))]

    def _wave_counts(self, rid: str, wave: int) -> dict[str, int]:
        return {row["status"]: row["n"] for row in self.db.q(
            "SELECT status, COUNT(*) n FROM rollout_devices WHERE rollout_id = ? AND wave = ? GROUP BY status", (rid, wave))}

    def _advance(self, r: dict[str, Any], now: float) -> None:
        rid, wave, waves = r["id"], r["wave"], r["waves"]
        devs = self._wave_devices(rid, wave, pending_only=True)
        if r["wave_started_at"] is None:
            with self._sending():   # the wave's rows and its start mark commit together: never sent twice
                for d in devs:
                    if d["status"] == "pending":
                        self._send_install(r, d, now)
                self.db.x("UPDATE rollouts SET wave_started_at = ?, bake_started_at = NULL, updated_at = ? WHERE id = ?",
                          (now, now, rid))
                self.db.audit(now, "manager", "rollout.wave_start", rid,
                              {"wave": wave + 1, "of": len(waves), "devices": len(devs)})
            log.info("rollout %s: wave %d/%d started on %d device(s)", rid, wave + 1, len(waves), len(devs))
            return
        for d in devs:   # late joiners of the (last) wave now under way
            self._send_install(r, d, now)
        # only rows old enough to time out are read (not the whole wave on every tick: O(fleet) per tick)
        stale = now - min(self.config.offline_timeout_s, self.config.install_timeout_s)
        for d in self.db.q("SELECT rd.device_id, rd.sent_at, d.online FROM rollout_devices rd LEFT JOIN devices d"
                           " USING (device_id) WHERE rd.rollout_id = ? AND rd.wave = ? AND rd.status IN (?, ?)"
                           " AND rd.sent_at < ?", (rid, wave, *INFLIGHT, stale)):
            # offline devices are pending until offline_timeout_s, then count as failed
            age = now - (d["sent_at"] or now)
            if (not d["online"] and age > self.config.offline_timeout_s) or age > self.config.install_timeout_s:
                why = (f"offline for more than {self.config.offline_timeout_s:.0f}s" if not d["online"]
                       else f"no result within {self.config.install_timeout_s:.0f}s")
                self.db.x("UPDATE rollout_devices SET status = 'timeout', reason = ?, updated_at = ?"
                          " WHERE rollout_id = ? AND device_id = ? AND status IN ('sent', 'installing')",
                          (why, now, rid, d["device_id"]))
        counts = self._wave_counts(rid, wave)
        inflight = sum(counts.get(s, 0) for s in INFLIGHT)
        ctx = self._gate_context(r, counts)
        results = evaluate_all([gate_from_dict(g) for g in r["gates"]], ctx)
        gate_json = json.dumps([g.to_dict() for g in results])
        if gate_json != json.dumps(r["gate_results"]):    # no write (and commit) per tick when nothing moved
            self.db.x("UPDATE rollouts SET gate_results = ? WHERE id = ?", (gate_json, rid))
        failure = next(g for g in results if g.name == "failure_rate")
        if not failure.ok:
            return self._breach(r, failure, now)
        if inflight:
            return
        if r["bake_started_at"] is None:
            self.db.x("UPDATE rollouts SET bake_started_at = ? WHERE id = ?", (now, rid))
            log.info("rollout %s: wave %d/%d done (%d committed, %d failed); baking %.0fs", rid, wave + 1,
                     len(waves), ctx.committed, ctx.failed, r["bake_s"])
            return
        breach = next((g for g in results if not g.ok), None)
        if breach is not None:
            return self._breach(r, breach, now)
        if now - r["bake_started_at"] < r["bake_s"]:
            return
        if wave + 1 < len(waves):
            self.db.x("UPDATE rollouts SET wave = ?, wave_started_at = NULL, bake_started_at = NULL, updated_at = ?"
                      " WHERE id = ?", (wave + 1, now, rid))
            self.db.audit(now, "manager", "rollout.wave_passed", rid,
                          {"wave": wave + 1, "gates": [g.to_dict() for g in results]})
            log.info("rollout %s: wave %d/%d passed its gates", rid, wave + 1, len(waves))
            self._advance(self._rollout(rid), now)
        else:
            self._set_state(rid, "completed", "manager", "rollout.complete", None,
                            gates=[g.to_dict() for g in results])

    def _send_install(self, r: dict[str, Any], d: dict[str, Any], now: float, join=None) -> None:
        """Send rollout ``r``'s artifact to device row ``d`` (device_id, active), remembering what it ran before
        (``join(conn)``, if given, adds the device to the rollout in the same transaction)."""
        rid = r["id"]
        active = json.loads(d["active"]) if d["active"] else None
        prev_sha = active.get("sha256") if active else None

        def record(conn, dep, seq):
            if join is not None:
                join(conn)
            conn.execute("UPDATE rollout_devices SET status = 'sent', deployment_id = ?, seq = ?, sent_at = ?,"
                         " updated_at = ?, prev_sha = ?, prev_name = ?, prev_version = ?"
                         " WHERE rollout_id = ? AND device_id = ?",
                         (dep, seq, now, now, prev_sha, active and active.get("name"),
                          active and active.get("version"), rid, d["device_id"]))

        self.send_desired(d["device_id"], rollout_id=rid, kind="install", sha256=r["sha256"],
                          health_window_s=r["health_window_s"], record=record)

    def _enroll_late_devices(self, now: float) -> int:
        """Late joiners (rule in docs/fleet-protocol.md): a device goes to the NEWEST running/paused/completed
        rollout whose selector it matches, unless it is in an active rollout or one as new or newer holds it;
        it joins the LAST wave (sent when that wave starts, at once if under way or completed)."""
        changes = self._changes    # a full pass only when something changed since the last one, not every tick
        if changes == self._changes_done:
            return 0
        rows = self.db.q("SELECT id FROM rollouts WHERE state IN (?,?,?)", JOINABLE)
        rollouts = sorted((self._rollout(row["id"]) for row in rows), key=lambda x: int(x["id"]), reverse=True)
        newest: dict[str, int] = {}
        busy: set[str] = set()
        # a device only pending/skipped in an aborted or rolled back rollout was never touched by it
        for row in self.db.q("SELECT rd.device_id, MAX(CASE WHEN r.state IN (?,?,?) OR rd.status NOT IN ('pending', 'skipped')"
                             " THEN CAST(rd.rollout_id AS INTEGER) END) newest,"
                             f" MAX(CASE WHEN r.state IN ({','.join('?' * len(ACTIVE_STATES))}) THEN 1 ELSE 0 END) busy"
                             " FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id GROUP BY rd.device_id",
                             (*JOINABLE, *ACTIVE_STATES)):
            newest[row["device_id"]] = row["newest"] or 0
            if row["busy"]:
                busy.add(row["device_id"])
        joined = 0
        for dev in self.db.q("SELECT device_id, labels, active FROM devices ORDER BY device_id"):
            device_id = dev["device_id"]
            if device_id in busy:
                continue
            labels = json.loads(dev["labels"])
            r = next((x for x in rollouts if P.selector_matches(x["selector"], labels)), None)
            if r is None or newest.get(device_id, 0) >= int(r["id"]):
                continue
            wave = len(r["waves"]) - 1

            def join(conn, r=r, device_id=device_id, labels=labels, wave=wave):   # row + audit in one transaction
                conn.execute("INSERT INTO rollout_devices (rollout_id, device_id, wave, status, updated_at)"
                             " VALUES (?,?,?,?,?)", (r["id"], device_id, wave, "pending", now))
                self.db.audit(now, "manager", "rollout.device_join", r["id"],
                              {"device_id": device_id, "labels": labels, "wave": wave + 1, "rollout_state": r["state"],
                               "target": f"{r['name']}@{r['version']}"})

            if r["state"] == "completed":     # nothing left to wait for: its desired state now
                self._send_install(r, dict(dev), now, join=join)
            else:
                with self.db.tx() as db:
                    join(db.conn)
            log.info("rollout %s (%s): late device %s joins wave %d/%d", r["id"], r["state"], device_id,
                     wave + 1, len(r["waves"]))
            joined += 1
        self._changes_done = changes
        return joined

    def _breach(self, r: dict[str, Any], gate, now: float) -> None:
        reason = f"gate {gate.name} breached in wave {r['wave'] + 1}: {gate.detail} (value {gate.value}, limit {gate.threshold})"
        self._set_state(r["id"], "rolling_back", "manager", "rollout.breach", reason, gate=gate.to_dict())
        self._advance_rollback(self._rollout(r["id"]), now)

    def _gate_context(self, r: dict[str, Any], counts: dict[str, int]) -> GateContext:
        # only telemetry and drift gates read the updated devices and merged histograms: a failure-rate-only
        # rollout skips these O(fleet) reads on every tick
        telemetry_gates = any(g["name"] not in ("failure_rate", "drift_psi") for g in r["gates"])
        needs_devices = telemetry_gates or any(g["name"] == "drift_psi" for g in r["gates"])
        updated = [d["device_id"] for d in self.db.q(
            "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND status = 'committed'", (r["id"],))
            ] if needs_devices else []
        olds = {(d["prev_name"], d["prev_version"]) for d in self.db.q(
            "SELECT DISTINCT prev_name, prev_version FROM rollout_devices WHERE rollout_id = ? AND prev_version IS NOT NULL",
            (r["id"],))} if telemetry_gates else set()
        new = self._version_stats(r["name"], [r["version"]], updated) if telemetry_gates else VersionStats()
        old = VersionStats()
        if olds and telemetry_gates:
            old = self._version_stats(r["name"], sorted(v for n, v in olds if v != r["version"]), None)
        from edgeml.fleet.drift import gate_value

        def drift() -> tuple[float | None, str]:
            return gate_value(self.db, self.store.root, r["name"], r["version"], updated, since=r["created_at"],
                              now=self.clock())

        return GateContext(wave=r["wave"], wave_devices=sum(counts.values()),
                           failed=sum(counts.get(s, 0) for s in FAILED), committed=counts.get("committed", 0),
                           new=new, old=old, drift=drift)

    def _version_stats(self, name: str, versions: list[str], devices: list[str] | None) -> VersionStats:
        if not versions:
            return VersionStats()
        rows = self.db.q(f"SELECT * FROM telemetry WHERE name = ? AND version IN ({','.join('?' * len(versions))})",
                         (name, *versions))
        if devices is not None:
            keep = set(devices)
            rows = [r for r in rows if r["device_id"] in keep]
        return VersionStats(requests=sum(r["requests"] for r in rows), failures=sum(r["failures"] for r in rows),
                            buckets=merge(stored_buckets(r["buckets"]) for r in rows),
                            devices=len({r["device_id"] for r in rows}))

    def _advance_rollback(self, r: dict[str, Any], now: float) -> None:
        rid = r["id"]
        todo = self.db.q("SELECT * FROM rollout_devices WHERE rollout_id = ? AND status IN"
                         " ('sent', 'installing', 'committed', 'failed', 'timeout', 'superseded') AND rollback_status IS NULL", (rid,))
        with self._sending():   # every rollback message of this round in one commit
            for d in todo:
                prev = d["prev_sha"]
                if prev is not None and self.db.one("SELECT 1 FROM artifacts WHERE sha256 = ?", (prev,)) is None:
                    self.db.x("UPDATE rollout_devices SET rollback_status = 'failed', reason = ? WHERE rollout_id = ? AND device_id = ?",
                              (f"previous artifact {prev[:12]} is not in the store", rid, d["device_id"]))
                    continue
                def record(conn, dep, seq, d=d):
                    conn.execute("UPDATE rollout_devices SET rollback_status = 'sent', rollback_deployment_id = ?,"
                                 " rollback_sent_at = ? WHERE rollout_id = ? AND device_id = ?", (dep, now, rid, d["device_id"]))

                self.send_desired(d["device_id"], rollout_id=rid, kind="rollback", sha256=prev,
                                  health_window_s=r["health_window_s"], record=record)
        if todo:
            log.info("rollout %s: rolling back %d device(s)", rid, len(todo))
            self.db.x("UPDATE rollout_devices SET status = 'skipped' WHERE rollout_id = ? AND status = 'pending'", (rid,))
        waiting = self.db.q("SELECT rd.device_id, rd.rollback_sent_at, d.online FROM rollout_devices rd LEFT JOIN devices d"
                            " USING (device_id) WHERE rd.rollout_id = ? AND rd.rollback_status = 'sent'", (rid,))
        for w in waiting:  # an offline device converges when it returns (its desired state is retained)
            if now - (w["rollback_sent_at"] or now) > (self.config.offline_timeout_s if not w["online"]
                                                       else self.config.install_timeout_s):
                self.db.x("UPDATE rollout_devices SET rollback_status = 'timeout' WHERE rollout_id = ? AND device_id = ?"
                          " AND rollback_status = 'sent'", (rid, w["device_id"]))
        left = self.db.one("SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = ? AND rollback_status = 'sent'", (rid,))[0]
        if not left:
            self._set_state(rid, "rolled_back", "manager", "rollout.rolled_back")

    # ================================================================ commands from the CLI
    def process_commands(self) -> int:
        rows = self.db.q("SELECT * FROM commands WHERE status = 'pending' ORDER BY id")
        for c in rows:
            args = json.loads(c["args"])
            try:
                result = self.execute(c["command"], args, c["actor"])
                self.db.x("UPDATE commands SET status = 'done', result = ?, done_at = ? WHERE id = ?",
                          (json.dumps(result, default=str), self.clock(), c["id"]))
            except EdgemlError as exc:
                self.db.x("UPDATE commands SET status = 'error', error = ?, done_at = ? WHERE id = ?",
                          (json.dumps(exc.to_dict()), self.clock(), c["id"]))
                self.db.audit(self.clock(), c["actor"], f"command.{c['command']}.refused", args.get("id"), exc.message)
        return len(rows)

    def execute(self, command: str, args: dict[str, Any], actor: str) -> dict[str, Any]:
        if command == "rollout.start":
            return self.start_rollout(args["target"], selector=args.get("selector", {}), waves=args["waves"],
                                      max_failure_rate=args["max_failure_rate"], bake_s=args["bake_s"],
                                      gates=args.get("gates", []), actor=actor, health_window_s=args.get("health_window_s"))
        if command.startswith("experiment."):     # fleet/experiments.py
            from edgeml.fleet.experiments import execute as experiment_command

            return experiment_command(self, command, args, actor)
        ops = {"rollout.pause": self.pause, "rollout.resume": self.resume, "rollout.abort": self.abort,
               "rollout.rollback": self.rollback}
        if command not in ops:
            raise UsageError(f"unknown manager command {command!r}")
        return ops[command](args["id"], actor)

    # ================================================================ reads
    def rollout_status(self, rid: str) -> dict[str, Any]:
        return rollout_status(self.db, rid)


def register_artifact(db: FleetDB, rec: dict[str, Any], actor: str, now: float) -> dict[str, Any]:
    existing = db.one("SELECT sha256 FROM artifacts WHERE name = ? AND version = ?", (rec["name"], rec["version"]))
    if existing is not None and existing["sha256"] != rec["sha256"]:
        raise FleetError(f"{rec['name']}@{rec['version']} is already published with different content",
                         hint="bump the version: a version names one exact artifact")
    db.x("INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?,?,?,?,?)",
         (rec["sha256"], rec["name"], rec["version"], rec["size"], int(rec["signed"]), rec.get("target"), now, actor))
    db.audit(now, actor, "artifact.publish", f"{rec['name']}@{rec['version']}", rec)
    return rec


def rollout_status(db: FleetDB, rid: str) -> dict[str, Any]:
    r = row_dict(db.one("SELECT * FROM rollouts WHERE id = ?", (str(rid),)), ("selector", "waves", "gates", "gate_results"))
    if r is None:
        raise FleetError(f"no rollout {rid!r}", hint="list them with: edgeml fleet rollout status")
    per_wave: list[dict[str, int]] = [dict() for _ in r["waves"]]
    rollback: dict[str, int] = {}
    for row in db.q("SELECT wave, status, rollback_status, COUNT(*) n FROM rollout_devices WHERE rollout_id = ?"
                    " GROUP BY wave, status, rollback_status", (str(rid),)):
        per_wave[row["wave"]][row["status"]] = per_wave[row["wave"]].get(row["status"], 0) + row["n"]
        if row["rollback_status"]:
            rollback[row["rollback_status"]] = rollback.get(row["rollback_status"], 0) + row["n"]
    failures = [dict(x) for x in db.q("SELECT device_id, wave, status, reason FROM rollout_devices WHERE rollout_id = ?"
                                      " AND status IN ('failed', 'timeout') ORDER BY device_id LIMIT 20", (str(rid),))]
    from edgeml.fleet.gates.failure_rate import refresh_reason, refresh_result

    # stored gate text is recomputed from today's counts (late joiners, devices failing after the breach)
    inclusive = next((g.get("inclusive", False) for g in r["gates"] if g["name"] == "failure_rate"), True)
    wave_counts = per_wave[r["wave"]] if r["wave"] < len(per_wave) else {}
    gates = [refresh_result(g, r["wave"], wave_counts, inclusive) for g in r["gate_results"] or []]
    return {"id": r["id"], "target": f"{r['name']}@{r['version']}", "state": r["state"],
            "reason": refresh_reason(r["reason"], r["wave"], wave_counts),
            "wave": r["wave"] + 1, "waves": [wave_label(w) for w in r["waves"]], "per_wave": per_wave,
            "rollback": rollback, "gates": gates, "selector": r["selector"],
            "max_failure_rate": r["max_failure_rate"], "bake_s": r["bake_s"], "created_by": r["created_by"],
            "created_at": r["created_at"], "updated_at": r["updated_at"], "failures": failures}
