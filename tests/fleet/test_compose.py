"""deploy/compose/docker-compose.yml, tested where this machine can (no container runtime in CI): the file parses,
every edgeml command in it is a valid invocation of the real CLI (parsed by click, no run), nats.conf is valid for
each node (``nats-server -t``), PostgreSQL settings agree with the managers' --db, and the two manager replicas'
commands RUN -- hosts, ports, paths and the key swapped for the test's PostgreSQL schema and broker -- until one of
them leads, then stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from natscluster import nats_binary
from pgtest import pg_schemas  # noqa: F401 - fixture

from edgeml.errors import EdgemlError
from edgeml.fleet.broker import free_port
from edgeml.fleet.db import FleetDB
from edgeml.fleet.testing import wait_until
from edgeml.fleet.transport import BrokerConfig

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"


def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def manager_services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == "edgeml-manager:local"}


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_compose_parses_and_its_commands_are_valid_edgeml_invocations():
    from edgeml.fleet.cli import fleet_group

    doc = compose()
    managers = manager_services(doc)
    assert set(doc["services"]) == {"postgres", "nats-1", "nats-2", "nats-3", *managers} and len(managers) == 2
    manager_cmd = fleet_group.commands["manager"]
    for name, svc in managers.items():
        cmd = svc["command"]
        assert cmd[:2] == ["fleet", "manager"], name
        ctx = manager_cmd.make_context("manager", list(cmd[2:]))           # click refuses unknown/bad options
        assert ctx.params["metrics_port"] == 9108
        db = urlparse(option(cmd, "--db"))
        env = doc["services"]["postgres"]["environment"]
        assert db.scheme == "postgresql" and db.hostname == "postgres"
        assert db.username == env["POSTGRES_USER"] and db.path == "/" + env["POSTGRES_DB"]
        nodes = BrokerConfig(option(cmd, "--broker")).endpoints()
        assert sorted(h for h, _, _ in nodes) == ["nats-1", "nats-2", "nats-3"] and {p for _, p, _ in nodes} == {1883}
        assert option(cmd, "--public-url") == f"http://{svc['hostname']}:8765"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert {"sign_key", "pgpass"} <= set(svc["secrets"]) and option(cmd, "--sign-key") == "/run/secrets/sign_key"
    stores = {option(s["command"], "--store") for s in managers.values()}
    assert len(stores) == 1                                           # one shared artifact store (a volume)
    assert all(v.endswith(":" + stores.pop()) for v in doc["x-manager"]["volumes"])


def test_nats_conf_is_valid_for_every_node(tmp_path):
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    doc = compose()
    conf = COMPOSE_DIR / "nats.conf"
    text = conf.read_text()
    for name in ("nats-1", "nats-2", "nats-3"):
        svc = doc["services"][name]
        assert svc["environment"]["NATS_NAME"] == svc["hostname"] == name and f"nats-route://{name}:6222" in text
        out = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=20,
                             env={**os.environ, "NATS_NAME": name})
        assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "stream_replicas: 3" in text


@pytest.mark.mqtt
def test_the_manager_replicas_commands_run(pg_schemas, broker, keys, tmp_path):  # noqa: F811
    url = pg_schemas.url()
    procs, metrics = [], []
    try:
        for name, svc in manager_services(compose()).items():
            cmd = list(svc["command"])
            http, metrics_port = free_port(), free_port()
            swap = {"--db": url, "--store": str(tmp_path / "store"), "--broker": broker.url,
                    "--host": "127.0.0.1", "--port": str(http), "--public-url": f"http://127.0.0.1:{http}",
                    "--sign-key": str(keys["key"]), "--metrics-host": "127.0.0.1",
                    "--metrics-port": str(metrics_port)}
            for flag, value in swap.items():
                cmd[cmd.index(flag) + 1] = value
            assert set(cmd[2::2]) == set(swap)                       # nothing else in the command was left out
            metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")
            with open(tmp_path / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "edgeml.cli", *cmd], stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        wait_until(lambda: _leaders(url) == 1, 30, "one replica leading")
        for m in metrics:
            assert b"edgeml_" in wait_until(lambda m=m: _get(m), 20, f"{m} answering")
        assert all(p.poll() is None for p in procs)                  # the follower keeps running
    finally:
        codes: list[int | None] = []
        took = []
        for p in procs:                  # one at a time: the leader's and the follower's stop, each timed
            started = time.monotonic()
            p.send_signal(signal.SIGTERM)
            try:
                codes.append(p.wait(10))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(None)
            took.append(time.monotonic() - started)
    print(f"\nSIGTERM to exit, replicas on PostgreSQL: {', '.join(f'{t:.2f}s' for t in took)}")
    assert codes == [0, 0] and max(took) < 2.0, took


def _leaders(url: str) -> int:
    try:
        db = FleetDB(url, readonly=True)        # refused until the first replica has migrated the schema
    except EdgemlError:
        return 0
    try:
        return int(db.one("SELECT COUNT(*) FROM audit WHERE action = 'manager.leader'")[0])
    finally:
        db.close()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read()
    except OSError:
        return None
