"""Faults on real parts: kill -9 of agents in every install state, broker restart and manager restart mid-rollout."""

from __future__ import annotations

import json
import time

import pytest

from edgeml.fleet.testing import read_journal, wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
CRASH_STATES = ["received", "downloading", "verifying", "staged", "selftest", "swapped", "health"]


def start_rollout(m, target, waves, selector, bake_s=0.2):
    return m.start_rollout(target, selector=selector, waves=waves, max_failure_rate=0.1, bake_s=bake_s, gates=[],
                           actor="pytest")["id"]


def finished(m, rid, timeout):
    return wait_until(lambda: (s := m.rollout_status(rid))["state"] in ("completed", "rolled_back", "aborted") and s,
                      timeout, f"rollout {rid} to finish")


def versions(m, prefix):
    return {r["device_id"]: json.loads(r["active"])["version"] if r["active"] else None
            for r in m.db.q("SELECT device_id, active FROM devices WHERE device_id LIKE ?", (prefix + "%",))}


def test_kill9_in_every_install_state(broker, start_manager, agents, artifacts, tmp_path):
    svc = start_manager(broker.url, offline_timeout_s=60)
    m = svc.manager
    for k in ("v1", "v2"):
        m.publish_artifact(artifacts[k], "pytest")
    sel = {"fleet": "kill9"}
    devs = [f"k9-{s}" for s in CRASH_STATES]
    for d, state in zip(devs, CRASH_STATES):
        agents.start(d, broker.url, labels="fleet=kill9", crash_at=f"{state}@2.0.0")
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'k9-%'")[0] == len(CRASH_STATES),
               30, "all agents online")
    assert finished(m, start_rollout(m, "tiny@1.0.0", [1.0], sel), 40)["state"] == "completed"

    rid = start_rollout(m, "tiny@2.0.0", [1.0], sel)
    t = time.monotonic()
    for d, state in zip(devs, CRASH_STATES):   # each agent SIGKILLs itself right after journaling its state
        rc = agents.procs[d].wait(30)
        assert rc == -9, f"{d} exited {rc}"
        j = read_journal(tmp_path / d)
        assert j["committed"]["version"] == "1.0.0", f"{d}: the committed model must still be the good v1"
        assert j["pending"]["state"] == state and j["pending"]["desired"]["artifact"]["version"] == "2.0.0"
    # the manager sees them go offline (Last Will) and keeps them pending, not failed
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 0 AND device_id LIKE 'k9-%'")[0] == len(CRASH_STATES),
               15, "Last Wills")
    assert m.rollout_status(rid)["state"] == "running"
    for d, state in zip(devs, CRASH_STATES):   # "systemd" restarts them
        agents.start(d, broker.url, labels="fleet=kill9", crash_at=f"{state}@2.0.0")
    s = finished(m, rid, 60)
    print(f"\nkill -9 in {len(CRASH_STATES)} install states, restart, converge: {time.monotonic() - t:.1f}s")
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": len(CRASH_STATES)}], s
    for d, state in zip(devs, CRASH_STATES):
        j = read_journal(tmp_path / d)
        assert j["committed"]["version"] == "2.0.0" and j["previous"]["version"] == "1.0.0" and j["pending"] is None
        assert "resuming deployment" in agents.log(d) and (tmp_path / d / f"crashed-at-{state}").exists()


def test_kill9_mid_download_resumes(broker, start_manager, agents, artifacts, tmp_path):
    svc = start_manager(broker.url)
    m = svc.manager
    svc.server.httpd.throttle_bytes = 16          # ~1 s for the artifact: time to kill it mid-transfer
    m.publish_artifact(artifacts["v1"], "pytest")
    agents.start("dl-0", broker.url, labels="fleet=dl")
    wait_until(lambda: m.db.one("SELECT online FROM devices WHERE device_id = 'dl-0'"), 30, "agent online")
    rid = start_rollout(m, "tiny@1.0.0", [1.0], {"fleet": "dl"})
    part = wait_until(lambda: next((p for p in (tmp_path / "dl-0" / "slots").glob("*/*.part") if p.stat().st_size > 64), None),
                      20, "a partial download")
    agents.kill9("dl-0")
    size = part.stat().st_size
    assert 0 < size < artifacts["v1"].stat().st_size
    agents.start("dl-0", broker.url, labels="fleet=dl")
    assert finished(m, rid, 40)["state"] == "completed"
    assert f"at byte {size}" in agents.log("dl-0") or "resuming download" in agents.log("dl-0")
    assert read_journal(tmp_path / "dl-0")["committed"]["version"] == "1.0.0"


def test_broker_restart_mid_rollout(own_broker, start_manager, agents, artifacts, tmp_path):
    svc = start_manager(own_broker.url)
    m = svc.manager
    for k in ("v1", "v2"):
        m.publish_artifact(artifacts[k], "pytest")
    for i in range(3):
        agents.start(f"br-{i}", own_broker.url, labels="fleet=br")
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == 3, 30, "3 agents online")
    rid = start_rollout(m, "tiny@1.0.0", [0.33, 1.0], {"fleet": "br"}, bake_s=1.5)
    wait_until(lambda: m.rollout_status(rid)["per_wave"][0].get("committed") == 1, 30, "wave 1 committed")
    t = time.monotonic()
    own_broker.stop()
    time.sleep(1.0)
    own_broker.start()
    s = finished(m, rid, 60)
    print(f"\nbroker restart mid-rollout, then completion: {time.monotonic() - t:.1f}s")
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 1}, {"committed": 2}], s
    wait_until(lambda: set(versions(m, "br-").values()) == {"1.0.0"}, 10, "all on 1.0.0")
    for i in range(3):
        assert read_journal(tmp_path / f"br-{i}")["committed"]["version"] == "1.0.0"


def test_manager_restart_mid_rollout(broker, start_manager, agents, artifacts, tmp_path):
    svc = start_manager(broker.url)
    m = svc.manager
    for k in ("v1", "bad"):
        m.publish_artifact(artifacts[k], "pytest")
    for i in range(3):
        agents.start(f"mr-{i}", broker.url, labels="fleet=mr")
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'mr-%'")[0] == 3,
               30, "3 agents online")
    rid = start_rollout(m, "tiny@1.0.0", [0.33, 1.0], {"fleet": "mr"}, bake_s=1.0)
    wait_until(lambda: m.rollout_status(rid)["wave"] == 2, 30, "wave 2 to start")
    svc.stop()                                     # manager goes away while wave 2 installs
    time.sleep(1.5)
    svc2 = start_manager(broker.url)               # same db, same artifact port
    m2 = svc2.manager
    s = finished(m2, rid, 40)
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 1}, {"committed": 2}], s
    # and a breach after the restart still rolls back correctly
    rid2 = start_rollout(m2, "tiny@3.0.0", [0.33, 1.0], {"fleet": "mr"})
    s = finished(m2, rid2, 40)
    assert s["state"] == "rolled_back"
    wait_until(lambda: set(versions(m2, "mr-").values()) == {"1.0.0"}, 10, "all on 1.0.0")
