"""Issue 11's "also fix" rows, each on the real manager (SQLite file, injected clock) or the real CLI helpers:
label-selected waves in one rollout, terminal states after an abort, "no data yet" for a gate without data,
replayed Last Wills after a broker restart applied once, and the status update that used to scan every row
of a rollout (the 10,000-device quadratic)."""

from __future__ import annotations

import logging

import pytest

from edgeml.errors import UsageError
from edgeml.fleet import protocol as P
from edgeml.fleet.rollout_cli import status_text as _status_text
from edgeml.fleet.gates import GateContext, VersionStats, parse_gate
from edgeml.fleet.waves import assign_waves, parse_waves

from test_manager import FakeFleet, env  # noqa: F401 - the fixture is used by name


def test_label_waves_parse_and_assign():
    assert parse_waves("ring=canary,50%,100%") == ["ring=canary", 0.5, 1.0]
    for bad in ("ring=,100%", "50%,ring=canary", "5%,ring"):
        with pytest.raises(UsageError):
            parse_waves(bad)
    ids = [f"d{i:02d}" for i in range(20)]
    labels = {d: {"ring": "canary" if i < 3 else "main"} for i, d in enumerate(ids)}
    waves = assign_waves("7", ids, ["ring=canary", 0.5, 1.0], labels)
    assert sorted(waves[0]) == ids[:3]                  # every canary, nobody else
    assert len(waves[0]) + len(waves[1]) == 10          # 50% cumulative, canaries counted
    assert sorted(sum(waves, [])) == ids                # each device exactly once
    assert [len(w) for w in assign_waves("7", ids, [0.05, 0.25, 1.0])] == [1, 4, 15]   # fractions unchanged


def test_label_wave_rollout_goes_canary_first(env):  # noqa: F811
    m, clock, link, _ = env
    fleet = FakeFleet(m, 10)
    for d in ("d01", "d07"):
        fleet.devices[d]["labels"] = {"hw": "x", "ring": "canary"}
        fleet.heartbeat(d)
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "x"}, waves=parse_waves("ring=canary,50%,100%"),
                        max_failure_rate=0.1, bake_s=0, gates=[], actor="t")
    m.tick()
    assert sorted(msg["device_id"] for msg in link.sent) == ["d01", "d07"]
    s = m.rollout_status(r["id"])
    assert s["waves"] == ["ring=canary", "50%", "100%"]
    rows = _status_text(s).splitlines()[2:]   # the wave table: one row per wave, in order
    assert [row.split()[1] for row in rows[:3]] == ["ring=canary", "50%", "100%"]
    for _ in range(3):
        fleet.answer(link)
        m.tick(); m.tick()
    s = m.rollout_status(r["id"])
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 2}, {"committed": 3}, {"committed": 5}]


def test_abort_leaves_every_wave_terminal(env):  # noqa: F811
    m, clock, link, _ = env
    FakeFleet(m, 10)
    r = m.start_rollout("tiny@1.0.0", selector={}, waves=[0.2, 0.5, 1.0], max_failure_rate=0.1, bake_s=60,
                        gates=[], actor="t")
    m.tick()
    s = m.abort(r["id"], "t")
    assert s["state"] == "aborted"
    assert s["per_wave"][0] == {"sent": 2} and s["per_wave"][1:] == [{"skipped": 3}, {"skipped": 5}]


def test_gate_without_data_says_no_data_yet():
    ctx = GateContext(wave=0, wave_devices=2, failed=0, committed=2, new=VersionStats(), old=VersionStats())
    results = [parse_gate(e).evaluate(ctx) for e in ("p95_latency_ms<50", "p95_ratio<1.2", "error_rate<0.01")]
    for g in results:
        assert g.ok and g.value is None and g.detail.startswith("no data yet") and "None" not in g.detail
    status = {"id": "1", "target": "tiny@1", "state": "running", "wave": 1, "waves": ["100%"], "created_by": "t",
              "reason": None, "per_wave": [{}], "rollback": {}, "failures": [], "gates": [g.to_dict() for g in results]}
    text = _status_text(status)
    assert "no data yet" in text and "None" not in text


def test_replayed_last_will_is_applied_once(env, caplog):  # noqa: F811
    m, clock, link, _ = env
    FakeFleet(m, 1)
    offline = P.encode({"schema_version": 1, "type": "presence", "device_id": "d00", "online": False,
                        "ts": clock() + 1, "reason": "connection lost (Last Will)"})
    clock.advance(2)
    with caplog.at_level(logging.INFO, logger="edgeml.fleet.manager"):
        for _ in range(3):      # the broker restarts twice and replays the retained Last Will each time
            m.on_message(P.topic("d00", "presence"), offline, True)
    assert sum("d00 offline" in r.getMessage() for r in caplog.records) == 1
    online = {"schema_version": 1, "type": "presence", "device_id": "d00", "online": True, "ts": clock() + 5,
              "labels": {"hw": "x"}, "active": None}
    m.on_message(P.topic("d00", "presence"), P.encode(online), True)
    m.on_message(P.topic("d00", "presence"), offline, True)     # an old Last Will never flips a live device
    assert m.db.one("SELECT online FROM devices WHERE device_id = 'd00'")["online"] == 1


def test_status_updates_use_the_primary_key(env):  # noqa: F811
    """Each event's rollout_devices update is a primary-key lookup, not a scan of the rollout's rows (what made
    a 10,000-device rollout quadratic: benchmarks/fleet_scale.py, docs/scale.md)."""
    m, *_ = env
    plan = m.db.q("EXPLAIN QUERY PLAN UPDATE rollout_devices SET status = 'committed'"
                  " WHERE rollout_id = '1' AND device_id = 'd00' AND deployment_id = 'x'")
    detail = " ".join(row["detail"] for row in plan)
    assert "USING INDEX" in detail and "device_id=?" in detail, detail
    source = open(m.__class__.__module__.replace(".", "/").replace("edgeml/", "", 1) + ".py").read()
    assert "WHERE rollout_id = ? AND deployment_id = ?" not in source


def test_gate_text_follows_a_late_joiner(env):  # noqa: F811
    m, clock, link, _ = env
    fleet = FakeFleet(m, 3)
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "x"}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[],
                        actor="t")
    m.tick()
    fleet.answer(link)
    m.tick(); m.tick()
    assert m.rollout_status(r["id"])["state"] == "completed"
    fleet.devices["d03"] = {"labels": {"hw": "x"}, "active": None, "ev": 0}      # a device joins late
    fleet.heartbeat("d03")
    m.tick()
    fleet.answer(link)
    m.tick()
    s = m.rollout_status(r["id"])
    assert s["per_wave"] == [{"committed": 4}]
    assert s["gates"][0]["detail"] == "0/4 devices failed in wave 1", s["gates"]     # was "0/3" beside committed=4


def test_breach_reason_adds_the_failures_counted_after_it(env):  # noqa: F811
    m, clock, link, _ = env
    fleet = FakeFleet(m, 10)
    r = m.start_rollout("tiny@1.0.0", selector={"hw": "x"}, waves=[1.0], max_failure_rate=0.1, bake_s=0, gates=[],
                        actor="t")
    m.tick()
    late = [d for d in fleet.devices if d not in ("d00", "d01")]
    fleet.answer(link, fail=("d00", "d01"), silent=late)                            # 2/10 failed: breach
    m.tick()
    s = m.rollout_status(r["id"])
    assert (s["reason"] or "").startswith("gate failure_rate breached in wave 1: 2/10 devices failed"), s
    fleet.answer(link, fail=("d02", "d03", "d04"))                                  # more fail after the breach
    m.tick()
    s = m.rollout_status(r["id"])
    assert "2/10 devices failed in wave 1" in s["reason"] and s["reason"].endswith("; 5/10 failed by now"), s["reason"]
    assert s["gates"][0]["detail"] == "5/10 devices failed in wave 1" and s["gates"][0]["value"] == 0.5
    assert s["per_wave"][0].get("failed", 0) + s["per_wave"][0].get("timeout", 0) == 5
