"""A real 3-node NATS cluster (routes, JetStream, MQTT gateway, stream replicas 3) started by the test on free
loopback ports. Manager and agents get all three nodes' URLs (each agent starting at a different node); the node
the manager and one agent are on is killed -9 during wave 1's bake; both fail over and the rollout completes."""

from __future__ import annotations

import re

import pytest
from natscluster import NatsCluster, nats_binary

from edgeml.fleet.testing import wait_until

pytestmark = pytest.mark.mqtt


@pytest.fixture
def nats3(tmp_path):
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    cluster = NatsCluster(tmp_path / "nats", binary)
    cluster.workdir.mkdir()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_kill_a_nats_node_mid_rollout(nats3, start_manager, agents, artifacts):
    # offline timeout above the cluster's recovery (docs/scale.md: under 20 s here), as a deployment should set it
    svc = start_manager(nats3.urls(0), offline_timeout_s=90)   # manager on n1 first
    m = svc.manager
    m.publish_artifact(artifacts["v1"], "pytest")
    for i in range(3):                                    # agent i starts on node i: n1, n2, n3
        agents.start(f"nats-{i}", nats3.urls(i), labels="fleet=nats")
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == 3, 40, "3 agents online")
    assert svc.transport is not None
    victim = next(i for i, n in enumerate(nats3.nodes) if n.mqtt == svc.transport.port)   # the manager's node
    r = m.start_rollout("tiny@1.0.0", selector={"fleet": "nats"}, waves=[0.33, 1.0], max_failure_rate=0.0,
                        bake_s=3.0, gates=[], actor="pytest")
    wait_until(lambda: m.rollout_status(r["id"])["per_wave"][0].get("committed") == 1, 40, "wave 1 committed")
    on_victim = [i for i in range(3) if _last_node(agents.log(f"nats-{i}")) == nats3.nodes[victim].mqtt]
    nats3.kill(victim)                                    # the manager's node (and its agents'), mid-bake
    wait_until(lambda: svc.transport.connected and svc.transport.port != nats3.nodes[victim].mqtt, 40,
               "the manager on another node")
    s = wait_until(lambda: (s := m.rollout_status(r["id"]))["state"] in ("completed", "rolled_back", "aborted") and s,
                   120, "the rollout to finish")
    assert s["state"] == "completed" and s["per_wave"] == [{"committed": 1}, {"committed": 2}], s
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == 3, 20,
               "every agent online again")
    for i in on_victim:                                   # those agents now live on a surviving node
        wait_until(lambda i=i: _last_node(agents.log(f"nats-{i}")) not in (None, nats3.nodes[victim].mqtt), 10,
                   f"agent nats-{i} on a surviving node")
    print(f"\nkilled node n{victim + 1}: the manager and agents {on_victim} were on it")


def _last_node(log: str) -> int | None:
    """The MQTT port of the node an agent last connected to (from its log)."""
    ports = re.findall(r"connected to 127\.0\.0\.1:(\d+)", log)
    return int(ports[-1]) if ports else None
