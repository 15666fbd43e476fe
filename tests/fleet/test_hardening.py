"""Issue 9 rows 10, 12, 13 (fleet) and issue 12 item 5: the protocol edge, the manager's loop, the CLI's
refusals and failure codes. Real SQLite, real artifacts, real subprocesses for the CLI; devices are played by
messages fed to Manager.on_message (as in test_manager.py)."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys

import pytest

from edgeml.errors import MessageRejected
from edgeml.fleet import protocol as P
from edgeml.fleet.manager import Manager, ManagerConfig

from test_manager import Clock, FakeFleet, Link  # noqa: E402 - same folder, shared device players


def _edgeml(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _one_error_line(proc):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[0]


@pytest.fixture
def env(tmp_path, artifacts):
    clock, link = Clock(), Link()
    cfg = ManagerConfig(db=tmp_path / "fleet.db", heartbeat_timeout_s=1e6, offline_timeout_s=100, install_timeout_s=1000)
    m = Manager(cfg, link, clock=clock, artifact_base_url="http://store")
    for k in ("v1", "v2"):
        m.publish_artifact(artifacts[k], "alice")
    return m, clock, link, cfg


def _telemetry(device="d00", **model):
    row = {"name": "tiny", "version": "1.0.0", "requests": 10, "failures": 0,
           "latency_buckets_ms": {"1": 5, "+Inf": 10}, "latency_sum_ms": 5.0, **model}
    return {"schema_version": 1, "type": "telemetry", "device_id": device, "ts": 1.0, "interval_s": 1.0,
            "active": None, "models": [row]}


# ------------------------------------------------------------------ row 10: numbers and depth at the edge
@pytest.mark.parametrize("model, reason", [
    ({"latency_buckets_ms": {"1": "x"}}, "expected int"),                 # the rogue message
    ({"latency_buckets_ms": {"7": 1}}, "not the fixed bucket edges"),
    ({"latency_buckets_ms": {"1": -1}}, ">= 0"),
    ({"latency_buckets_ms": {"1": 2 ** 70}}, "the limit is"),
    ({"latency_buckets_ms": {"1": 1.5}}, "expected int"),
    ({"latency_buckets_ms": {"1": True}}, "expected int"),
    ({"requests": -3}, ">= 0"),
    ({"requests": 2 ** 70}, "the limit is"),
    ({"failures": 11}, "failures 11 > requests 10"),
    ({"latency_sum_ms": -1.0}, ">= 0"),
])
def test_telemetry_numbers_are_validated(model, reason):
    payload = P.encode(_telemetry(**{k: v for k, v in model.items()}))
    with pytest.raises(MessageRejected, match=reason):
        P.validate(P.topic("d00", "telemetry"), payload)


@pytest.mark.parametrize("raw, reason", [
    (b'"ts": NaN', "not valid UTF-8 JSON"),
    (b'"ts": Infinity', "not valid UTF-8 JSON"),
    (b'"ts": 1e400', "finite"),
])
def test_non_finite_floats_are_refused(raw, reason):
    payload = P.encode(_telemetry()).replace(b'"ts":1.0', raw)
    with pytest.raises(MessageRejected, match=reason):
        P.validate(P.topic("d00", "telemetry"), payload)


def test_deep_json_is_a_refused_message_not_a_recursion_error(env):
    m, *_ = env
    deep = b"[" * 30000 + b"]" * 30000
    with pytest.raises(MessageRejected, match="nested 30000 deep"):
        P.validate(P.topic("d00", "telemetry"), deep)
    inside = b'{"schema_version": 1, "x": ' + b"[" * 20 + b"]" * 20 + b"}"
    with pytest.raises(MessageRejected, match="nested 21 deep"):
        P.decode(inside)
    assert P.json_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1     # brackets inside strings do not count
    m.on_message(P.topic("d00", "heartbeat"), deep)     # the manager refuses it: nothing raises
    assert "nested 30000 deep" in m.rejected[-1]


def test_other_fields_of_other_messages_are_validated():
    hb = {"schema_version": 1, "type": "heartbeat", "device_id": "d00", "ts": 1.0, "labels": {}, "state": "idle",
          "active": None, "committed_seq": -1}
    for mutate, reason in [
        (lambda m: m.update(state="hacking"), "unknown state"),
        (lambda m: m.update(committed_seq=-5), "committed_seq must be >= -1"),
        (lambda m: m.update(refused=-1), ">= 0"),
        (lambda m: m.update(active={"seq": "x"}), "active.seq has type str"),
        (lambda m: m.update(active={"seq": 1, "evil": 2}), "unknown fields"),
        (lambda m: m.update(labels={"a": 1}), "labels must be"),
        (lambda m: m.update(last_failed={"deployment_id": "d", "seq": 1, "code": "whatever"}), "is not one of"),
    ]:
        bad = json.loads(json.dumps(hb))
        mutate(bad)
        with pytest.raises(MessageRejected, match=reason):
            P.validate(P.topic("d00", "heartbeat"), json.dumps(bad).encode())


def _gated_rollout(m, gate):
    return m.start_rollout("tiny@2.0.0", selector={}, waves=[0.5, 1.0], max_failure_rate=0.5, bake_s=5,
                           gates=[gate], actor="alice")["id"]


def _junk_telemetry_rows(m):
    """Rows as a rogue device could store them before this validation existed (or a hand edit)."""
    with m.db.tx() as db:
        for dev, buckets in (("d00", '{"1": "x"}'), ("d01", "not json"), ("d02", "[" * 5000 + "]" * 5000)):
            db.conn.execute("INSERT OR REPLACE INTO telemetry VALUES (?,?,?,?,?,?,?,?)",
                            (dev, "tiny", "2.0.0", 1.0, 10, 0, buckets, 1.0))


@pytest.mark.parametrize("slow, expect", [(False, "completed"), (True, "rolled_back")])
def test_rogue_telemetry_never_stops_a_gated_rollout(env, tmp_path, slow, expect):
    m, clock, link, cfg = env
    fleet = FakeFleet(m, 4)
    m.on_message(P.topic("d00", "telemetry"), P.encode(_telemetry(latency_buckets_ms={"1": "x"})))
    assert "expected int" in m.rejected[-1]                  # refused at the edge ...
    _junk_telemetry_rows(m)                                  # ... and junk already in the database is survived
    rid = _gated_rollout(m, "p95_latency_ms<50")
    for _ in range(6):
        m.tick()
        fleet.answer(link)
        for d, dev in fleet.devices.items():
            if dev["active"] and dev["active"]["version"] == "2.0.0":
                fleet.telemetry(d, 400.0 if slow else 1.0)
        m.tick()
        clock.advance(6)
    assert m.rollout_status(rid)["state"] == expect
    out = _edgeml("fleet", "telemetry", "--db", str(cfg.db))
    assert out.returncode == 0 and "tiny@2.0.0" in out.stdout and "Traceback" not in out.stderr, out.stderr


def test_tick_isolates_one_broken_rollout(env):
    """A rollout whose row cannot be read (here: a hand-broken waves column) is skipped and logged; the other
    rollout still advances in the same ticks."""
    m, clock, link, _ = env
    fleet = FakeFleet(m, 2, labels={"hw": "a"})
    for i in range(2):
        fleet.devices[f"b{i}"] = {"labels": {"hw": "b"}, "active": None, "ev": 0}
        fleet.heartbeat(f"b{i}")
    broken = m.start_rollout("tiny@1.0.0", selector={"hw": "a"}, waves=[1.0], max_failure_rate=0.5, bake_s=0,
                             gates=[], actor="alice")["id"]
    good = m.start_rollout("tiny@1.0.0", selector={"hw": "b"}, waves=[0.5, 1.0], max_failure_rate=0.5, bake_s=0,
                           gates=[], actor="alice")["id"]
    m.db.x("UPDATE rollouts SET waves = '{\"not\": \"a list\"}' WHERE id = ?", (broken,))
    for _ in range(6):
        m.tick()
        fleet.answer(link)
        clock.advance(1)
    assert m.rollout_status(good)["state"] == "completed"


# ------------------------------------------------------------------ issue 12 item 5: codes, enums, SQL
def _event(fleet, d, msg, state, **extra):
    dev = fleet.devices[d]
    dev["ev"] += 1
    fleet.send(d, "events", state=state, deployment_id=msg["deployment_id"], deploy_seq=msg["seq"], attempt=1,
               event_seq=dev["ev"], **extra)


def test_superseded_is_decided_by_code_not_by_reason_text(env):
    m, clock, link, _ = env
    fleet = FakeFleet(m, 2)
    rid = m.start_rollout("tiny@1.0.0", selector={}, waves=[1.0], max_failure_rate=1.0, bake_s=0, gates=[],
                          actor="alice")["id"]
    m.tick()
    by_dev = {msg["device_id"]: msg for msg in link.sent}
    # a reason that merely starts with "superseded" is a failure; the code says what happened
    _event(fleet, "d00", by_dev["d00"], "failed", reason="superseded by my own bug", code="selftest")
    _event(fleet, "d01", by_dev["d01"], "failed", reason="replaced", code="superseded")
    rows = {r["device_id"]: r["status"] for r in m.db.q("SELECT device_id, status FROM rollout_devices WHERE rollout_id = ?", (rid,))}
    assert rows == {"d00": "failed", "d01": "superseded"}


def test_status_columns_only_take_enum_values_and_old_databases_upgrade(tmp_path):
    from edgeml.fleet.db import SCHEMA, SCHEMA_VERSION, FleetDB

    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA[0] + ";" + SCHEMA[1] + "; PRAGMA user_version = 2;")
    conn.execute("INSERT INTO rollouts (id, name, version, sha256, selector, waves, max_failure_rate, bake_s, gates,"
                 " state, created_at, created_by, updated_at) VALUES ('1','t','1','s','{}','[1.0]',0.1,0,'[]',"
                 "'running',0,'a',0)")
    conn.commit()
    conn.close()
    db = FleetDB(path)
    assert db.schema_version() == SCHEMA_VERSION and db.one("SELECT state FROM rollouts")["state"] == "running"
    with pytest.raises(sqlite3.IntegrityError, match="not a RolloutState"):
        db.x("UPDATE rollouts SET state = 'runing' WHERE id = '1'")
    with pytest.raises(sqlite3.IntegrityError, match="not a DeviceStatus"):
        db.x("INSERT INTO rollout_devices (rollout_id, device_id, wave, status) VALUES ('1', 'd', 0, 'done?')")
    db.x("UPDATE rollouts SET state = 'paused' WHERE id = '1'")


# ------------------------------------------------------------------ row 13 (fleet CLI)
@pytest.mark.parametrize("manifest", [b"null", b"42", b"[1]", b'{"schema_version": 1}'])
def test_publish_of_a_bad_manifest_is_one_error_and_writes_nothing(tmp_path, manifest):
    import zipfile

    bad = tmp_path / "bad.edgepkg"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", manifest)
    work = tmp_path / "work"
    work.mkdir()
    line = _one_error_line(_edgeml("fleet", "publish", str(bad), "--db", str(work / "fleet.db"), cwd=work))
    assert line.startswith("error:") and "manifest" in line
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.parametrize("kind", ["garbage", "foreign", "missing", "folder", "newer"])
def test_fleet_devices_with_a_wrong_db_is_one_error_and_changes_nothing(tmp_path, kind):
    db = tmp_path / "x.db"
    if kind == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    elif kind == "foreign":
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE notes (t TEXT)")
        conn.commit()
        conn.close()
    elif kind == "folder":
        db.mkdir()
    elif kind == "newer":
        conn = sqlite3.connect(db)
        conn.executescript("CREATE TABLE meta (k); CREATE TABLE devices (d); CREATE TABLE rollouts (r);"
                           " PRAGMA user_version = 99;")
        conn.close()
    before = db.read_bytes() if db.is_file() else None
    for args in (["fleet", "devices"], ["fleet", "telemetry"], ["fleet", "rollout", "status"]):
        out = _edgeml(*args, "--db", str(db))
        line = _one_error_line(out)
        if kind == "folder":      # click's own check of the option (exit 2, usage + one error line)
            assert "is a directory" in out.stderr, out.stderr
        else:
            assert line.startswith("error:") and str(db) in line, line
    if before is not None:
        assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["x.db"])


# ------------------------------------------------------------------ row 12 (agent CLI)
@pytest.mark.parametrize("extra, reason", [
    (["--heartbeat", "0s"], "--heartbeat '0s' is outside"),
    (["--heartbeat", "-1s"], "non-negative"),
    (["--heartbeat", "nan"], "finite"),
    (["--telemetry", "1ms"], "--telemetry '1ms' is outside"),
    (["--health-max-error-rate", "2"], "between 0 and 1"),
    (["--http-port", "99999"], "is not a port"),
])
def test_agent_refuses_bad_options(tmp_path, keys, extra, reason):
    out = _edgeml("agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1", "--state-dir", str(tmp_path / "s"),
                  "--trusted-key", str(keys["pub"]), *extra)
    assert reason in _one_error_line(out)


@pytest.mark.parametrize("kind", ["missing", "not_a_key", "private_key"])
def test_agent_refuses_a_trusted_key_that_is_not_an_ed25519_public_key(tmp_path, keys, kind):
    key = {"missing": tmp_path / "nope.pub", "private_key": keys["key"]}.get(kind, tmp_path / "junk.pub")
    if kind == "not_a_key":
        key.write_text("hello")
    out = _edgeml("agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1", "--state-dir", str(tmp_path / "s"),
                  "--trusted-key", str(key), "--http-port", "-1")
    line = _one_error_line(out)
    assert line.startswith("error:") and str(key) in line


def test_bounded_numbers_helpers():
    assert P.MAX_INT < 2 ** 63 and math.isfinite(float(P.MAX_INT))
