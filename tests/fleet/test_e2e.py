"""End to end on a real Mosquitto: manager in process, agents as subprocesses, the real artifact HTTP server."""

from __future__ import annotations

import json
import time

import pytest

from edgeml.fleet import protocol as P
from edgeml.fleet.transport import BrokerConfig, MqttTransport

from edgeml.fleet.testing import read_journal as journal, wait_until

pytestmark = pytest.mark.mqtt


def run_rollout(m, target, waves, timeout=40, selector=None, **kw):
    # the broker is shared between tests: select on labels unique to the test (retained presence of others remains)
    r = m.start_rollout(target, selector=selector or {"fleet": "test"}, waves=waves, max_failure_rate=kw.pop("max_failure_rate", 0.1),
                        bake_s=kw.pop("bake_s", 0.2), gates=kw.pop("gates", []), actor="pytest")
    return wait_until(lambda: (s := m.rollout_status(r["id"]))["state"] in ("completed", "rolled_back", "aborted") and s,
                      timeout, f"rollout of {target} to finish")


def active_versions(m, prefix="e2e-"):
    # the broker is shared: retained presence of other tests' devices shows up too
    return {r["device_id"]: json.loads(r["active"])["version"] if r["active"] else None
            for r in m.db.q("SELECT device_id, active FROM devices WHERE device_id LIKE ? ORDER BY device_id",
                            (prefix + "%",))}


def test_rollout_to_three_agents_then_broken_version_rolls_back(broker, start_manager, agents, artifacts, tmp_path):
    svc = start_manager(broker.url)
    m = svc.manager
    for k in ("v1", "v2", "bad"):
        m.publish_artifact(artifacts[k], "pytest")
    for i in range(3):
        agents.start(f"e2e-{i}", broker.url)
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'e2e-%'")[0] == 3, 30, "3 agents online")

    t = time.monotonic()
    s = run_rollout(m, "tiny@1.0.0", [1.0])
    print(f"\nv1 to 3 agents: {time.monotonic() - t:.1f}s")
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 3}]
    s = run_rollout(m, "tiny@2.0.0", [0.33, 1.0], gates=["p95_latency_ms<50", "error_rate<0.01"])
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 1}, {"committed": 2}], s
    assert all(g["ok"] for g in s["gates"])
    wait_until(lambda: set(active_versions(m).values()) == {"2.0.0"}, 10, "registry to show 2.0.0")

    t = time.monotonic()
    s = run_rollout(m, "tiny@3.0.0", [0.33, 1.0])
    print(f"broken v3 aborted and rolled back: {time.monotonic() - t:.1f}s")
    assert s["state"] == "rolled_back" and "failure_rate" in s["reason"]
    assert s["per_wave"] == [{"failed": 1}, {"skipped": 2}] and s["rollback"] == {"done": 1}
    assert "golden" in s["failures"][0]["reason"]
    wait_until(lambda: set(active_versions(m).values()) == {"2.0.0"}, 10, "every device back on 2.0.0")
    for i in range(3):
        j = journal(tmp_path / f"e2e-{i}")
        assert j["committed"]["version"] == "2.0.0" and j["pending"] is None
    # telemetry arrived, histograms merge across devices
    stats = m._version_stats("tiny", ["2.0.0"], None)
    assert stats.devices == 3 and stats.requests > 0 and stats.p95() is not None

    # rollback by hand of the completed v2 rollout returns everyone to v1
    m.rollback("2", "pytest")
    wait_until(lambda: m.rollout_status("2")["state"] == "rolled_back", 30, "manual rollback")
    wait_until(lambda: set(active_versions(m).values()) == {"1.0.0"}, 10, "every device back on 1.0.0")


def test_bad_messages_over_mqtt_are_refused(broker, start_manager, agents, artifacts, tmp_path, keys):
    svc = start_manager(broker.url)
    m = svc.manager
    m.publish_artifact(artifacts["v1"], "pytest")
    agents.start("victim", broker.url, labels="fleet=victim")
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id = 'victim'")[0] == 1, 30, "agent online")
    s = run_rollout(m, "tiny@1.0.0", [1.0], selector={"fleet": "victim"})
    assert s["state"] == "completed"
    before = journal(tmp_path / "victim")

    rogue = MqttTransport(BrokerConfig(broker.url), "rogue").start()
    assert rogue.wait_connected(5)
    t = P.topic("victim", "desired")
    good = json.loads(m.db.one("SELECT payload FROM desired WHERE device_id = 'victim'")["payload"])
    forged = dict(good, seq=good["seq"] + 100, deployment_id="evil")          # signature no longer matches
    old = dict(good, seq=0, deployment_id="old")
    old.pop("sig")
    other_key = P.sign(dict(good, seq=good["seq"] + 101, deployment_id="evil2"), keys["other"])
    for payload in [b"garbage", b"{" + b" " * P.MAX_MESSAGE_BYTES + b"}", P.encode(forged), P.encode(old),
                    P.encode(other_key)]:
        rogue.publish(t, payload, 1, False)
    # the manager refuses garbage on device topics too
    rogue.publish(P.topic("victim", "events"), b"{\"schema_version\": 1}", 1, False)
    wait_until(lambda: agents.log("victim").count("refused message") >= 5, 10, "agent to log 5 refusals")
    wait_until(lambda: len(m.rejected) >= 1, 5, "manager to refuse the bad event")
    log = agents.log("victim")
    for reason in ("not valid UTF-8 JSON", "over the", "bad signature", "unsigned", "not among the trusted keys"):
        assert reason in log, reason
    time.sleep(0.5)
    after = journal(tmp_path / "victim")
    assert after["committed"] == before["committed"] and after["highest_seq"] == before["highest_seq"]
    # the refusals are counted in the heartbeat the manager stores
    wait_until(lambda: m.db.one("SELECT refused FROM devices WHERE device_id = 'victim'")["refused"] >= 5, 5,
               "refusal count in the registry")
    rogue.stop()
