"""Broker authentication (username/password) and TLS against a Mosquitto configured for them."""

from __future__ import annotations

import json

import pytest

from edgeml.fleet import protocol as P
from edgeml.fleet.broker import Broker
from edgeml.fleet.testing import make_test_pki, wait_until
from edgeml.fleet.transport import BrokerConfig, MqttTransport

pytestmark = pytest.mark.mqtt


def try_connect(cfg: BrokerConfig, wait: float = 1.5) -> MqttTransport:
    t = MqttTransport(cfg, "probe").start()
    t.wait_connected(wait)
    t.stop(2)
    return t


def test_username_password(mosquitto_bin, tmp_path):
    b = Broker(tmp_path / "b", kind="mosquitto", users={"device": "s3cret"}).start()
    try:
        assert try_connect(BrokerConfig(b.url, username="device", password="s3cret")).connects == 1
        bad = try_connect(BrokerConfig(b.url, username="device", password="wrong", protocol="5"))
        assert bad.connects == 0 and "refused" in (bad.last_error or "")
        assert try_connect(BrokerConfig(b.url)).connects == 0          # anonymous refused
    finally:
        b.stop()


def test_tls_with_client_certificates_and_agent_cli(mosquitto_bin, tmp_path, agents, keys):
    pki = make_test_pki(tmp_path / "pki")
    b = Broker(tmp_path / "b", kind="mosquitto", users={"device": "s3cret"}, require_client_cert=True,
               tls={"ca": pki["ca"], "cert": pki["server_cert"], "key": pki["server_key"]}).start()
    assert b.url.startswith("mqtts://")
    tls = dict(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    try:
        assert try_connect(BrokerConfig(b.url, username="device", password="s3cret", **tls)).connects == 1
        other = make_test_pki(tmp_path / "other-pki")                  # a CA the broker's cert is not from
        assert try_connect(BrokerConfig(b.url, username="device", password="s3cret", tls_ca=other["ca"],
                                        tls_cert=pki["client_cert"], tls_key=pki["client_key"])).connects == 0
        assert try_connect(BrokerConfig(b.url, username="device", password="s3cret", tls_ca=pki["ca"])).connects == 0

        seen = []
        watcher = MqttTransport(BrokerConfig(b.url, username="device", password="s3cret", **tls), "watcher",
                                on_message=lambda t, p, r: seen.append(json.loads(p)))
        watcher.subscribe(P.wildcard("presence"), 1)
        watcher.start()
        (tmp_path / "pw").write_text("s3cret\n")
        agents.start("tls-0", b.url, labels="fleet=tls", extra=[
            "--username", "device", "--password-file", str(tmp_path / "pw"), "--tls-ca", str(pki["ca"]),
            "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])])
        wait_until(lambda: any(m["device_id"] == "tls-0" and m["online"] for m in seen), 20,
                   "the agent's birth message over TLS")
        watcher.stop()
    finally:
        b.stop()
