"""Manager logic with an injected clock (no sleeps): waves, bake, gates, offline, pause/resume/abort/rollback,
audit, restart. Devices are played by messages fed to Manager.on_message; SQLite is a real file."""

from __future__ import annotations

import json

import pytest

from edgeml.errors import FleetError
from edgeml.fleet import protocol as P
from edgeml.fleet.db import SCHEMA_VERSION
from edgeml.fleet.manager import Manager, ManagerConfig
from edgeml.fleet.metrics import Histogram


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


class Link:
    def __init__(self):
        self.sent = []

    def publish(self, topic, payload, qos=1, retain=False):
        assert retain and qos == 1
        self.sent.append(json.loads(payload))
        return True


class FakeFleet:
    """Plays N devices: answers desired messages with events, as told."""

    def __init__(self, manager, n, labels=None):
        self.m = manager
        self.devices = {f"d{i:02d}": {"labels": labels or {"hw": "x"}, "active": None, "ev": 0} for i in range(n)}
        for d in self.devices:
            self.heartbeat(d)

    def send(self, d, kind, **fields):
        msg = {"schema_version": 1, "device_id": d, "ts": self.m.clock(), **fields}
        msg["type"] = P.TYPE_FOR_KIND[kind]
        self.m.on_message(P.topic(d, kind), P.encode(msg))

    def heartbeat(self, d):
        dev = self.devices[d]
        self.send(d, "heartbeat", labels=dev["labels"], state="idle", active=dev["active"],
                  committed_seq=dev["active"]["seq"] if dev["active"] else -1)

    def answer(self, link, fail=(), silent=()):
        """Reply to every desired message not answered yet."""
        for msg in link.sent:
            d = msg["device_id"]
            if msg.get("_answered") or d in silent:
                continue
            msg["_answered"] = True
            dev = self.devices[d]
            dev["ev"] += 1
            art = msg["artifact"]
            base = dict(deployment_id=msg["deployment_id"], deploy_seq=msg["seq"], attempt=1, event_seq=dev["ev"],
                        name=art and art["name"], version=art and art["version"])
            if d in fail and not msg["rollback"]:
                self.send(d, "events", state="failed", reason="self-test failed: simulated", **base)
            else:
                dev["active"] = {"name": art["name"], "version": art["version"], "seq": msg["seq"],
                                 "deployment_id": msg["deployment_id"], "sha256": art["sha256"]} if art else None
                self.send(d, "events", state="committed", active=dev["active"], **base)

    def telemetry(self, d, latency_ms, n=20, failures=0):
        h = Histogram()
        for _ in range(n):
            h.observe(latency_ms)
        a = self.devices[d]["active"]
        self.send(d, "telemetry", interval_s=1.0, active=a, models=[{
            "name": a["name"], "version": a["version"], "requests": n, "failures": failures,
            "latency_buckets_ms": h.cumulative(), "latency_sum_ms": h.sum_ms}])


@pytest.fixture
def env(tmp_path, artifacts):
    clock, link = Clock(), Link()
    cfg = ManagerConfig(db=tmp_path / "fleet.db", heartbeat_timeout_s=30, offline_timeout_s=100, install_timeout_s=1000)
    m = Manager(cfg, link, clock=clock, artifact_base_url="http://store")
    for k in ("v1", "v2", "bad"):
        m.publish_artifact(artifacts[k], "alice")
    return m, clock, link, cfg


def versions(fleet):
    return sorted({(d["active"] or {}).get("version") for d in fleet.devices.values()}, key=str)


def test_waves_advance_only_after_commit_and_bake(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 20)
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "x"}, waves=[0.1, 0.5, 1.0], max_failure_rate=0.1,
                        bake_s=60, gates=[], actor="alice")
    m.tick()
    assert len(link.sent) == 2                       # wave 1 = 10% of 20
    m.tick()
    assert m.rollout_status(r["id"])["wave"] == 1
    fleet.answer(link)
    m.tick()                                         # wave committed: bake starts
    clock.advance(59)
    m.tick()
    assert m.rollout_status(r["id"])["wave"] == 1 and len(link.sent) == 2
    clock.advance(2)
    m.tick()
    assert m.rollout_status(r["id"])["wave"] == 2 and len(link.sent) == 10
    fleet.answer(link)
    m.tick(); clock.advance(61); m.tick()
    assert len(link.sent) == 20
    fleet.answer(link)
    m.tick(); clock.advance(61); m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 2}, {"committed": 8}, {"committed": 10}]
    assert versions(fleet) == ["1.0.0"]
    actions = [row["action"] for row in m.db.q("SELECT action FROM audit ORDER BY id")]
    assert actions.count("rollout.wave_passed") == 2 and actions[-1] == "rollout.complete"
    assert m.db.one("SELECT actor FROM audit WHERE action = 'rollout.start'")["actor"] == "alice"


def test_failure_rate_breach_rolls_back_every_updated_device(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 10)
    m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick(); fleet.answer(link); m.tick(); m.tick()
    r = m.start_rollout("tiny@2.0.0", selector={}, waves=[0.5, 1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick()
    wave1 = [msg["device_id"] for msg in link.sent if not msg.get("_answered")]
    fleet.answer(link, fail=set(wave1[:2]))          # 2/5 fail > 10%
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "rolling_back" and "failure_rate" in s["reason"]
    rollbacks = [msg for msg in link.sent if msg["rollback"]]
    assert sorted(x["device_id"] for x in rollbacks) == sorted(wave1)   # updated and failed ones, not wave 2
    assert all(x["artifact"]["version"] == "1.0.0" for x in rollbacks)
    fleet.answer(link)
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "rolled_back" and s["rollback"] == {"done": 5} and s["per_wave"][1] == {"skipped": 5}
    assert versions(fleet) == ["1.0.0"]


def test_latency_gate_new_vs_old_from_merged_histograms(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 4)
    m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick(); fleet.answer(link); m.tick(); m.tick()
    for d in fleet.devices:
        fleet.telemetry(d, 3)
    r = m.start_rollout("tiny@2.0.0", selector={}, waves=[0.5, 1.0], max_failure_rate=0.1, bake_s=30,
                        gates=["p95_ratio<1.5", "p95_latency_ms<50"], actor="a")
    m.tick(); fleet.answer(link); m.tick()
    updated = [d for d, v in fleet.devices.items() if v["active"]["version"] == "2.0.0"]
    fleet.telemetry(updated[0], 3)
    fleet.telemetry(updated[1], 40)                 # one slow device: merged p95 is slow
    clock.advance(10)
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "rolling_back", s
    assert "p95_ratio" in s["reason"]


def test_offline_devices_pending_until_timeout(env):
    m, clock, link, cfg = env
    fleet = FakeFleet(m, 4)
    r = m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=0.3, bake_s=0, gates=[], actor="a")
    m.tick()
    fleet.send("d03", "presence", online=False, reason="Last Will")
    fleet.answer(link, silent={"d03"})
    m.tick()
    clock.advance(50)
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "running" and s["per_wave"][0] == {"committed": 3, "sent": 1}
    clock.advance(60)
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["per_wave"][0] == {"committed": 3, "timeout": 1} and s["state"] == "running"   # 25% <= 30%
    m.tick()
    assert m.rollout_status(r["id"])["state"] == "completed"


def test_heartbeat_expiry_marks_offline(env):
    m, clock, link, cfg = env
    FakeFleet(m, 2)
    assert m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == 2
    clock.advance(cfg.heartbeat_timeout_s + 1)
    m.tick()
    assert m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == 0


def test_pause_resume_abort_rollback_and_commands(env, tmp_path):
    from edgeml.fleet.service import CommandClient

    m, clock, link, cfg = env
    fleet = FakeFleet(m, 4)
    r = m.start_rollout("tiny@1.0.0", selector={}, waves=[0.25, 1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick(); fleet.answer(link); m.tick()
    m.pause(r["id"], "bob")
    m.tick(); m.tick()
    assert m.rollout_status(r["id"])["state"] == "paused" and len(link.sent) == 1
    with pytest.raises(FleetError, match="only a running rollout"):
        m.pause(r["id"], "bob")
    # commands from the CLI go through the db
    client = CommandClient(cfg.db, actor="carol")
    cid = client.db.x("INSERT INTO commands (ts, actor, command, args) VALUES (?,?,?,?)",
                      (0, "carol", "rollout.resume", json.dumps({"id": r["id"]}))).lastrowid
    m.tick()
    assert m.db.one("SELECT status FROM commands WHERE id = ?", (cid,))["status"] == "done"
    m.tick(); fleet.answer(link); m.tick(); m.tick()
    assert m.rollout_status(r["id"])["state"] == "completed"
    m.rollback(r["id"], "dave")
    m.tick(); fleet.answer(link); m.tick()
    assert m.rollout_status(r["id"])["state"] == "rolled_back"
    assert versions(fleet) == [None]                  # nothing was installed before
    r2 = m.start_rollout("tiny@2.0.0", selector={}, waves=[0.25, 1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.abort(r2["id"], "erin")
    assert m.rollout_status(r2["id"])["state"] == "aborted"
    who = {(row["actor"], row["action"]) for row in m.db.q("SELECT actor, action FROM audit")}
    assert {("bob", "rollout.pause"), ("carol", "rollout.resume"), ("dave", "rollout.rollback"),
            ("erin", "rollout.abort"), ("alice", "artifact.publish")} <= who


def test_restart_continues_rollout_and_dedupes_events(env, tmp_path):
    m, clock, link, cfg = env
    fleet = FakeFleet(m, 4)
    r = m.start_rollout("tiny@1.0.0", selector={}, waves=[0.5, 1.0], max_failure_rate=0.1, bake_s=10, gates=[], actor="a")
    m.tick()
    m.db.close()
    m2 = Manager(cfg, link, clock=clock, artifact_base_url="http://store")   # "restarted"
    fleet.m = m2
    fleet.answer(link)
    # a redelivered event (QoS 1 duplicate) changes nothing
    first = next(e for e in m2.db.q("SELECT * FROM events"))
    m2.on_message(P.topic(first["device_id"], "events"), P.encode({
        "schema_version": 1, "type": "event", "device_id": first["device_id"], "ts": 0, "event_seq": first["event_seq"],
        "deployment_id": first["deployment_id"], "deploy_seq": first["deploy_seq"], "attempt": 1, "state": "failed"}))
    m2.tick(); clock.advance(11); m2.tick()
    fleet.answer(link); m2.tick(); clock.advance(11); m2.tick()
    assert m2.rollout_status(r["id"])["state"] == "completed"
    assert m2.db.schema_version() == SCHEMA_VERSION


def test_refusals(env):
    m, clock, link, _ = env
    FakeFleet(m, 1)
    m.on_message(P.topic("d00", "events"), b"{}")
    m.on_message(P.topic("d00", "heartbeat"), b"x" * (P.MAX_MESSAGE_BYTES + 1))
    assert len(m.rejected) == 2
    with pytest.raises(FleetError, match="not published"):
        m.start_rollout("tiny@9", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    with pytest.raises(FleetError, match="no known device"):
        m.start_rollout("tiny@1.0.0", selector={"hw": "none"}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    with pytest.raises(FleetError, match="active rollout"):
        m.start_rollout("tiny@2.0.0", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")


def test_schema_migration_from_v1_and_newer_schema_refused(tmp_path):
    import sqlite3

    from edgeml.fleet.db import SCHEMA, SCHEMA_VERSION, FleetDB

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA[0] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO devices (device_id, labels) VALUES ('old-1', '{\"hw\": \"x\"}')")
    conn.commit()
    conn.close()
    db = FleetDB(path)
    assert db.schema_version() == SCHEMA_VERSION == 3
    row = db.one("SELECT device_id, endpoint FROM devices")
    assert row["device_id"] == "old-1" and row["endpoint"] is None
    db.x(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(FleetError, match="this edgeml knows up to"):
        FleetDB(path)


# ---------------------------------------------------------------- late joiners
def add_device(fleet, d, labels):
    fleet.devices[d] = {"labels": labels, "active": None, "ev": 0}
    fleet.heartbeat(d)


def sent_to(link, d):
    return [(msg["artifact"] or {}).get("version") for msg in link.sent if msg["device_id"] == d]


def joins(m):
    return [json.loads(row["detail"])["device_id"] for row in m.db.q(
        "SELECT detail FROM audit WHERE action = 'rollout.device_join' ORDER BY id")]


def test_late_device_joins_running_rollout_in_its_last_wave(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 4, labels={"hw": "rpi4"})
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "rpi4"}, waves=[0.5, 1.0], max_failure_rate=0.1, bake_s=10,
                        gates=[], actor="alice")
    m.tick()
    assert len(link.sent) == 2                                      # wave 1 cut from the 4 devices known at start
    add_device(fleet, "new-1", {"hw": "rpi4"})                      # provisioned mid-rollout
    add_device(fleet, "other", {"hw": "jetson"})                    # does not match the selector
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["per_wave"] == [{"sent": 2}, {"pending": 3}] and sent_to(link, "new-1") == []   # waits for its wave
    fleet.answer(link); m.tick(); clock.advance(11); m.tick()
    assert s["wave"] == 1 and m.rollout_status(r["id"])["wave"] == 2
    assert sent_to(link, "new-1") == ["1.0.0"] and len(link.sent) == 5
    fleet.answer(link); m.tick()                                    # last wave committed: baking
    add_device(fleet, "new-2", {"hw": "rpi4"})                      # joins the last wave while it is under way
    m.tick()
    assert sent_to(link, "new-2") == ["1.0.0"]
    clock.advance(11); m.tick()
    assert m.rollout_status(r["id"])["state"] == "running"          # waits for the late device's result
    fleet.answer(link); m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 2}, {"committed": 4}]
    assert sent_to(link, "other") == [] and joins(m) == ["new-1", "new-2"]
    detail = json.loads(m.db.one("SELECT detail FROM audit WHERE action = 'rollout.device_join'")["detail"])
    assert detail["wave"] == 2 and detail["rollout_state"] == "running" and detail["target"] == "tiny@1.0.0"


def test_late_device_after_completion_converges_via_desired_state(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 3, labels={"hw": "rpi4"})
    add_device(fleet, "relabelled", {"hw": "jetson"})
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "rpi4"}, waves=[1.0], max_failure_rate=0.1, bake_s=0,
                        gates=[], actor="alice")
    m.tick(); fleet.answer(link); m.tick(); m.tick()
    assert m.rollout_status(r["id"])["state"] == "completed"
    add_device(fleet, "new-1", {"hw": "rpi4"})
    fleet.devices["relabelled"]["labels"] = {"hw": "rpi4"}          # starts matching the selector
    fleet.heartbeat("relabelled")
    m.tick()
    assert sent_to(link, "new-1") == ["1.0.0"] and sent_to(link, "relabelled") == ["1.0.0"]
    desired = json.loads(m.db.one("SELECT payload FROM desired WHERE device_id = 'new-1'")["payload"])
    assert desired["artifact"]["version"] == "1.0.0" and desired["rollout_id"] == r["id"]   # retained: converges when online
    fleet.answer(link)
    m.tick(); m.tick()
    assert len(link.sent) == 5                                      # once, not every tick
    s = m.rollout_status(r["id"])
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 5}]
    assert versions(fleet) == ["1.0.0"] and sorted(joins(m)) == ["new-1", "relabelled"]


def test_late_device_after_rollback_or_abort_does_not_get_that_version(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 4)
    m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick(); fleet.answer(link); m.tick(); m.tick()
    r = m.start_rollout("tiny@3.0.0", selector={}, waves=[0.5, 1.0], max_failure_rate=0.1, bake_s=0, gates=[], actor="a")
    m.tick()
    fleet.answer(link, fail=set(fleet.devices))                     # the bad version fails: breach, rolling back
    m.tick()
    assert m.rollout_status(r["id"])["state"] == "rolling_back"
    add_device(fleet, "new-1", {"hw": "x"})                         # arrives while it rolls back
    m.tick(); fleet.answer(link); m.tick()
    assert m.rollout_status(r["id"])["state"] == "rolled_back"
    add_device(fleet, "new-2", {"hw": "x"})                         # arrives after
    m.tick(); fleet.answer(link); m.tick()
    assert "3.0.0" not in sent_to(link, "new-1") + sent_to(link, "new-2")
    # they get what the fleet runs: the last completed rollout's version
    assert sent_to(link, "new-1") == ["1.0.0"] and sent_to(link, "new-2") == ["1.0.0"]
    assert versions(fleet) == ["1.0.0"]
    assert m.db.one("SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = ? AND device_id LIKE 'new-%'",
                    (r["id"],))[0] == 0
    # an aborted rollout pulls nobody in either: the late device gets the last completed rollout's version
    r3 = m.start_rollout("tiny@2.0.0", selector={}, waves=[0.25, 1.0], max_failure_rate=0.1, bake_s=0, gates=[],
                         actor="a")
    m.tick()
    add_device(fleet, "new-3", {"hw": "x"})                         # joins r3's last wave, not started yet
    m.tick()
    assert m.rollout_status(r3["id"])["per_wave"] == [{"sent": 2}, {"pending": 5}] and sent_to(link, "new-3") == []
    m.abort(r3["id"], "bob")
    add_device(fleet, "new-4", {"hw": "x"})
    m.tick(); m.tick()
    assert sent_to(link, "new-3") == ["1.0.0"] and sent_to(link, "new-4") == ["1.0.0"]
    assert m.db.one("SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = ? AND device_id = 'new-4'",
                    (r3["id"],))[0] == 0
    assert joins(m) == ["new-1", "new-2", "new-3", "new-3", "new-4"]   # r1, r1, r3, then r1 once r3 was aborted


def test_a_desired_state_the_broker_lost_is_resent_until_the_device_answers(env):
    m, clock, link, cfg = env
    fleet = FakeFleet(m, 2)

    def at(t):
        clock.t = t
        for d in fleet.devices:
            fleet.heartbeat(d)
        link.sent.clear()
        m.tick()
        return sorted((s["device_id"], s["deployment_id"], s["seq"]) for s in link.sent)

    m.start_rollout("tiny@1.0.0", selector={"hw": "x"}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[],
                    actor="alice")
    first = at(1000.0)                     # sent; the test's broker "loses" both (nobody answers)
    assert [d for d, _, _ in first] == ["d00", "d01"]
    assert at(1000.0 + cfg.resend_after_s - 5) == []                      # not silent long enough yet
    assert at(1000.0 + cfg.resend_after_s + 3) == first                   # the same deployments, same seq
    fleet.answer(link_with(first, m), silent=("d01",))                    # d00 answers, d01 stays silent
    assert [d for d, _, _ in at(1000.0 + 2 * cfg.resend_after_s + 6)] == ["d01"]


def link_with(sent, m):
    """A Link holding the stored desired messages of ``sent`` (device, deployment, seq), for FakeFleet.answer."""
    link = Link()
    for device_id, dep, _ in sent:
        row = m.db.one("SELECT payload FROM desired WHERE device_id = ? AND deployment_id = ?", (device_id, dep))
        link.sent.append(json.loads(bytes(row["payload"])))
    return link
