"""The MQTT transport: backoff with jitter, outbox while offline, MQTT 5 -> 3.1.1 fallback (amqtt)."""

from __future__ import annotations

import pytest

from edgeml.fleet.broker import Broker, free_port
from edgeml.fleet.testing import wait_until
from edgeml.fleet.transport import BrokerConfig, MqttTransport

pytestmark = pytest.mark.mqtt


def test_backoff_grows_and_is_jittered():
    t = MqttTransport(BrokerConfig("mqtt://127.0.0.1:1", backoff_min_s=0.5, backoff_max_s=8), "x")
    samples = {a: [t._backoff(a) for _ in range(200)] for a in (0, 3, 10)}
    for xs in samples.values():
        assert min(xs) >= 0.25 and max(xs) <= max(8, 0.5)
        assert len({round(x, 3) for x in xs}) > 50, "jitter: delays must differ"
    assert sum(samples[10]) / 200 > sum(samples[0]) / 200 * 3       # exponential growth up to the cap
    with pytest.raises(Exception, match="mqtt://"):
        BrokerConfig("http://broker:1883").endpoint()


def test_outbox_flushes_after_the_broker_comes_up(mosquitto_bin, tmp_path):
    port = free_port()
    t = MqttTransport(BrokerConfig(f"mqtt://127.0.0.1:{port}", backoff_min_s=0.1, backoff_max_s=0.3), "early").start()
    assert not t.publish("x/state", b"old", 1, retain=True)          # queued: no broker yet
    assert not t.publish("x/state", b"new", 1, retain=True)          # replaces the queued retained message
    b = Broker(tmp_path / "b", port=port, kind="mosquitto").start()
    try:
        assert t.wait_connected(10)
        got = []
        sub = MqttTransport(BrokerConfig(b.url), "late", on_message=lambda tp, p, r: got.append(p))
        sub.subscribe("x/#", 1)
        sub.start()
        wait_until(lambda: got, 5, "the retained message")
        assert got == [b"new"]
        sub.stop()
    finally:
        t.stop()
        b.stop()


def test_falls_back_to_mqtt_311_on_amqtt(tmp_path):
    pytest.importorskip("amqtt", reason="amqtt (pip extra 'demo') is not installed")
    b = Broker(tmp_path / "amqtt", kind="amqtt").start()
    try:
        got = []
        a = MqttTransport(BrokerConfig(b.url), "with-will", will=("x/will", b"gone", 1, True),
                          on_message=lambda tp, p, r: got.append(p))
        a.subscribe("x/#", 1)
        a.start()
        plain = MqttTransport(BrokerConfig(b.url), "plain").start()
        assert a.wait_connected(10) and plain.wait_connected(10)
        assert a.protocol_name == "3.1.1" and plain.protocol_name == "3.1.1"
        plain.publish("x/y", b"hello", 1, retain=True)   # retained: arrives even if the SUBSCRIBE is processed later
        wait_until(lambda: b"hello" in got, 15, "a message through amqtt")
        plain.stop()
        a.stop()
    finally:
        b.stop()


def test_several_brokers_parse_and_refuse_bad_ones():
    cfg = BrokerConfig("mqtt://n1:1883, mqtts://n2,mqtt://n3:2883")
    assert cfg.endpoints() == [("n1", 1883, False), ("n2", 8883, True), ("n3", 2883, False)]
    assert cfg.endpoint() == ("n1", 1883, False)
    for bad in ("mqtt://n1:1883,http://n2", ",", "mqtt://n1:99999"):
        with pytest.raises(Exception, match="broker URL"):
            BrokerConfig(bad).endpoints()


def test_fails_over_to_the_next_broker_and_back(mosquitto_bin, tmp_path):
    """Two real Mosquitto processes as two nodes: the first is stopped, the client moves to the second at once
    (no backoff: another node was left), re-subscribes and flushes; then the second goes and the first is back."""
    nodes = [Broker(tmp_path / f"n{i}", kind="mosquitto", persistence=False).start() for i in range(2)]
    got: list[bytes] = []
    t = MqttTransport(BrokerConfig(",".join(n.url for n in nodes), backoff_min_s=0.2, backoff_max_s=0.5), "multi",
                      on_message=lambda tp, p, r: got.append(p))
    t.subscribe("x/#", 1)
    try:
        t.start()
        assert t.wait_connected(10) and t.port == nodes[0].port
        nodes[0].stop()
        wait_until(lambda: t.connected and t.port == nodes[1].port, 10, "fail-over to node 2")
        assert t.publish("x/a", b"via node 2", 1)
        wait_until(lambda: b"via node 2" in got, 5, "the subscription renewed on node 2")
        nodes[0].start()
        nodes[1].stop()
        wait_until(lambda: t.connected and t.port == nodes[0].port, 10, "back on node 1")
        assert t.publish("x/b", b"via node 1", 1)
        wait_until(lambda: b"via node 1" in got, 5, "the subscription renewed on node 1")
    finally:
        t.stop()
        for n in nodes:
            n.stop()
