"""Shared fixtures for fleet tests: a real Mosquitto, signed tiny artifacts, agents as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeml.fleet.broker import Broker, free_port, mosquitto_binary


@pytest.fixture(scope="session")
def mosquitto_bin():
    path = mosquitto_binary()
    if not path:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    return path


@pytest.fixture(scope="session")
def broker(mosquitto_bin, tmp_path_factory):
    """One shared Mosquitto for tests that do not restart it."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"), kind="mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(mosquitto_bin, tmp_path):
    """A private Mosquitto this test may stop and restart (same port, persistence on)."""
    b = Broker(tmp_path / "mosquitto", kind="mosquitto").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from edgeml.runtime.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    key, pub = generate_keypair(d / "signing.key")
    other, other_pub = generate_keypair(d / "other.key")
    return {"key": key, "pub": pub, "other": other, "other_pub": other_pub}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, keys):
    from edgeml.fleet.testing import make_artifact

    d = tmp_path_factory.mktemp("artifacts")
    return {
        "v1": make_artifact(d / "tiny-1.edgepkg", "tiny", "1.0.0", sign_key=keys["key"]),
        "v2": make_artifact(d / "tiny-2.edgepkg", "tiny", "2.0.0", sign_key=keys["key"]),
        "bad": make_artifact(d / "tiny-3.edgepkg", "tiny", "3.0.0", sign_key=keys["key"], kind="bad_golden"),
        "unsigned": make_artifact(d / "tiny-4.edgepkg", "tiny", "4.0.0"),
        "other_signer": make_artifact(d / "tiny-5.edgepkg", "tiny", "5.0.0", sign_key=keys["other"]),
    }


@pytest.fixture
def start_manager(tmp_path, keys):
    """Factory: an in-process ManagerService with short timeouts; stopped at teardown."""
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.transport import BrokerConfig

    services = []
    port = free_port()

    def start(broker_url: str, db: Path | None = None, **overrides):
        cfg = dict(db=db or tmp_path / "fleet.db", http_port=port, heartbeat_timeout_s=5, tick_s=0.1,
                   sign_key=keys["key"], health_window_s=0.3, offline_timeout_s=30)
        cfg.update(overrides)
        svc = ManagerService(ManagerConfig(**cfg), BrokerConfig(broker_url, backoff_min_s=0.2, backoff_max_s=1)).start()
        services.append(svc)
        return svc

    yield start
    for svc in services:
        if not svc._stop.is_set():
            svc.stop()


class AgentProcs:
    """Agents as real subprocesses (``python -m edgeml.cli agent``)."""

    def __init__(self, tmp_path: Path, pub: Path):
        self.tmp = tmp_path
        self.pub = pub
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, device_id: str, broker_url: str, labels: str = "fleet=test", env: dict | None = None,
              extra: list[str] | None = None, crash_at: str | None = None) -> subprocess.Popen:
        """``crash_at="STATE[@VERSION]"``: the agent SIGKILLs itself once after journaling STATE (crash_agent.py)."""
        log = open(self.tmp / f"{device_id}.log", "ab")
        entry = [str(Path(__file__).with_name("crash_agent.py")), crash_at] if crash_at else ["-m", "edgeml.cli"]
        cmd = [sys.executable, *entry, "agent", "--broker", broker_url, "--device-id", device_id,
               "--labels", labels, "--state-dir", str(self.tmp / device_id), "--trusted-key", str(self.pub),
               "--heartbeat", "0.5s", "--telemetry", "1s", "--health-window", "0.3s", "--http-port", "-1",
               "--log-level", "info", *(extra or [])]
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True)
        log.close()
        self.procs[device_id] = p
        return p

    def kill9(self, device_id: str) -> None:
        p = self.procs[device_id]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def log(self, device_id: str) -> str:
        return (self.tmp / f"{device_id}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def agents(tmp_path, keys):
    procs = AgentProcs(tmp_path, keys["pub"])
    yield procs
    procs.stop_all()
