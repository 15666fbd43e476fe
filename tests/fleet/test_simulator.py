"""Fleet simulator on a real Mosquitto with the real manager: 500 devices, same protocol code (model run stubbed)."""

from __future__ import annotations

import json
import random
import time

import pytest

from edgeml.fleet.simulator import FleetSimulator, SimConfig
from edgeml.fleet.testing import wait_until
from edgeml.fleet.transport import BrokerConfig

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
N = 500


def test_500_devices_three_waves_then_20pct_failing_aborts_in_wave_1(own_broker, start_manager, artifacts, keys, tmp_path):
    svc = start_manager(own_broker.url, health_window_s=0.0, heartbeat_timeout_s=20)
    m = svc.manager
    for k in ("v1", "v2"):
        m.publish_artifact(artifacts[k], "pytest")
    ids = [f"sim-{i:04d}" for i in range(N)]
    failing = set(random.Random(7).sample(ids, N // 5))          # 20% fail v2's self-test
    sim = FleetSimulator(SimConfig(devices=N, failing=failing, failing_versions={"2.0.0"}, trusted_keys=[keys["pub"]],
                                   state_root=tmp_path / "sim"), BrokerConfig(own_broker.url)).start()
    try:
        wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == N, 60, f"{N} devices online")

        def rollout(target):
            t = time.monotonic()
            r = m.start_rollout(target, selector={"fleet": "sim"}, waves=[0.05, 0.25, 1.0], max_failure_rate=0.1,
                                bake_s=0.5, gates=[], actor="pytest")
            s = wait_until(lambda: (s := m.rollout_status(r["id"]))["state"] in ("completed", "rolled_back") and s,
                           120, f"rollout of {target}")
            return s, time.monotonic() - t

        s, secs = rollout("tiny@1.0.0")
        print(f"\nsimulator: {N} devices, 3 waves (5%,25%,100%), bake 0.5s: completed in {secs:.1f}s")
        assert s["state"] == "completed" and s["per_wave"] == [{"committed": 25}, {"committed": 100}, {"committed": 375}]
        assert sim.versions() == {"tiny@1.0.0": N}

        s, secs = rollout("tiny@2.0.0")
        wait_until(lambda: sim.versions() == {"tiny@1.0.0": N}, 20, "every device back on 1.0.0")
        print(f"simulator: {N} devices, 20% failing self-test: aborted in wave 1 and rolled back in {secs:.1f}s;"
              f" wave 1 {s['per_wave'][0]}, rollback {s['rollback']}")
        assert s["state"] == "rolled_back" and "failure_rate breached in wave 1" in s["reason"]
        assert s["per_wave"][1] == {"skipped": 100} and s["per_wave"][2] == {"skipped": 375}
        assert sum(s["per_wave"][0].values()) == 25 and s["rollback"] == {"done": 25}
        # the registry agrees with the devices, and says the model run was stubbed
        # (a heartbeat snapshot taken just before a commit may land after it: converges within a heartbeat)
        wait_until(lambda: {json.loads(r["active"])["version"] for r in m.db.q("SELECT active FROM devices")}
                   == {"1.0.0"}, 10, "the registry to show 1.0.0 everywhere")
        assert m.db.one("SELECT MIN(stubbed) FROM device_telemetry")[0] == 1
    finally:
        sim.stop()
