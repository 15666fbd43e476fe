"""A clustered broker's MQTT side, checked on a real nats-server (MQTT gateway + JetStream) on free loopback ports:
what edgeml keeps there. MQTT 5 is refused (so no ``$share``): the transport falls back to 3.1.1 by itself;
retained messages, QoS 1, Last Will and persistent sessions work; refused subscriptions are retried. The 3-node
cluster with a node killed mid-rollout: tests/fleet/test_cluster_nats3.py (docs/scale.md)."""

from __future__ import annotations

import shutil
import time
import subprocess
from pathlib import Path

import pytest

from edgeml.fleet.broker import free_port
from edgeml.fleet.testing import wait_until
from edgeml.fleet.transport import BrokerConfig, MqttTransport


@pytest.fixture
def nats_mqtt(tmp_path):
    binary = shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server",) if Path(p).exists()), None)
    if binary is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    port, mqtt = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\nserver_name: edgeml-test\n'
                    f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\nmqtt {{ listen: 127.0.0.1:{mqtt} }}\n')
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"mqtt://127.0.0.1:{mqtt}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_nats_mqtt_gateway_keeps_retained_and_qos1_on_311(nats_mqtt):
    pub = MqttTransport(BrokerConfig(nats_mqtt, backoff_min_s=0.1, backoff_max_s=0.5), "edgeml-pub")
    got: list[tuple[str, bytes]] = []
    sub = MqttTransport(BrokerConfig(nats_mqtt, backoff_min_s=0.1, backoff_max_s=0.5), "edgeml-sub",
                        on_message=lambda t, p, r: got.append((t, p)))
    try:
        pub.start()
        wait_until(lambda: pub.connected, 15, "a connection to the NATS MQTT gateway")
        assert pub.protocol_name == "3.1.1"           # MQTT 5 refused: fell back, so no $share subscriptions
        pub.publish("edgeml/v1/devices/d1/desired", b"retained state", 1, retain=True)
        sub.subscribe("edgeml/v1/devices/+/desired", 1)
        sub.start()
        wait_until(lambda: ("edgeml/v1/devices/d1/desired", b"retained state") in got, 15, "the retained message")
        pub.publish("edgeml/v1/devices/d1/desired", b"live", 1)
        wait_until(lambda: ("edgeml/v1/devices/d1/desired", b"live") in got, 10, "a live QoS 1 message")
    finally:
        pub.stop()
        sub.stop()


def test_a_refused_subscription_is_retried_on_the_same_connection(nats_mqtt):
    """The NATS MQTT gateway answers SUBACK 0x80 when it cannot make a subscription's JetStream consumer (seen while
    a cluster elects new leaders after a node died, tests/fleet/test_cluster_nats3.py) -- and, deterministically, for
    a topic with '.' (not allowed in NATS subjects). The transport retries refused subscriptions every
    ``resubscribe_s`` on the same connection instead of forgetting them; the granted ones deliver meanwhile."""
    got: list[bytes] = []
    sub = MqttTransport(BrokerConfig(nats_mqtt, backoff_min_s=0.1, backoff_max_s=0.5, resubscribe_s=0.2), "edgeml-r",
                        on_message=lambda t, p, r: got.append(p))
    pub = MqttTransport(BrokerConfig(nats_mqtt, backoff_min_s=0.1, backoff_max_s=0.5), "edgeml-rp")
    try:
        sub.subscribe("edgeml/v1/devices/bad.id/desired", 1)
        sub.subscribe("edgeml/v1/devices/good/desired", 1)
        sub.start()
        pub.start()
        wait_until(lambda: sub.refused_subscriptions >= 3, 15, "the refused subscription to be retried")
        assert sub.connects == 1                       # retried on the same connection, not by reconnecting

        def delivered() -> bool:
            pub.publish("edgeml/v1/devices/good/desired", b"granted", 1)
            return b"granted" in got

        wait_until(delivered, 10, "the granted subscription to deliver", interval=0.3)
    finally:
        sub.stop()
        pub.stop()


def test_nats_keeps_last_will_and_persistent_sessions(nats_mqtt, tmp_path):
    """The two features the table in docs/scale.md listed as untested: a client killed -9 gets its Last Will
    published (retained); a persistent-session client that was away receives the QoS 1 message sent meanwhile."""
    import sys

    got: list[tuple[str, bytes, bool]] = []
    watcher = MqttTransport(BrokerConfig(nats_mqtt, backoff_min_s=0.1, backoff_max_s=0.5), "edgeml-w",
                            on_message=lambda t, p, r: got.append((t, p, r)))
    child = (
        "import sys, time\n"
        "from edgeml.fleet.transport import BrokerConfig, MqttTransport\n"
        "t = MqttTransport(BrokerConfig(sys.argv[1]), 'edgeml-dies', will=('edgeml/v1/devices/dies/presence',"
        " b'offline', 1, True)).start()\n"
        "assert t.wait_connected(15)\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, nats_mqtt], stdout=subprocess.PIPE, text=True)
    away = MqttTransport(BrokerConfig(nats_mqtt, persistent_session=True, backoff_min_s=0.1, backoff_max_s=0.5),
                         "edgeml-away", on_message=lambda t, p, r: got.append((t, p, r)))
    try:
        watcher.subscribe("edgeml/v1/devices/+/presence", 1)
        watcher.start()
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        wait_until(lambda: watcher.connected, 20, "the watcher connected")
        proc.kill()                                      # no DISCONNECT: the broker must publish the Will
        proc.wait(10)
        wait_until(lambda: ("edgeml/v1/devices/dies/presence", b"offline", False) in got, 30, "the Last Will")

        away.subscribe("edgeml/v1/devices/away/desired", 1)
        away.start()
        wait_until(lambda: away.connected, 20, "the persistent client connected")

        def subscribed() -> bool:                        # its subscription is live before it leaves
            watcher.publish("edgeml/v1/devices/away/desired", b"before", 1)
            return any(p == b"before" for _, p, _ in got)

        wait_until(subscribed, 20, "the persistent client's subscription", interval=0.5)
        away.stop()
        watcher.publish("edgeml/v1/devices/away/desired", b"while away", 1)
        time.sleep(0.5)
        away = MqttTransport(BrokerConfig(nats_mqtt, persistent_session=True, backoff_min_s=0.1, backoff_max_s=0.5),
                             "edgeml-away", on_message=lambda t, p, r: got.append((t, p, r)))
        away.start()                                     # same client id, no new subscription: the session's
        wait_until(lambda: any(p == b"while away" for _, p, _ in got), 30, "the QoS 1 message queued in the session")
    finally:
        watcher.stop()
        away.stop()
        if proc.poll() is None:
            proc.kill()
