"""Fixtures for the deploy tests: a real Mosquitto, a fleet manager and agents as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeml.fleet.broker import Broker, free_port, mosquitto_binary

EDGEML = [sys.executable, "-m", "edgeml.cli"]


@dataclass
class Fleet:
    """A broker, one manager and N agents, all real processes on loopback."""

    root: Path
    broker: Broker
    key: Path
    pub: Path
    db: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([*EDGEML, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_manager(self) -> None:
        self.spawn("manager", ["fleet", "manager", "--broker", self.broker.url, "--db", str(self.db),
                               "--http-port", str(free_port()), "--sign-key", str(self.key),
                               "--heartbeat-timeout", "5s", "--health-window", "0.3s", "--log-level", "info"])

    def start_agent(self, device_id: str, labels: str) -> None:
        self.spawn(device_id, ["agent", "--broker", self.broker.url, "--device-id", device_id, "--labels", labels,
                               "--state-dir", str(self.root / device_id), "--trusted-key", str(self.pub),
                               "--heartbeat", "0.5s", "--telemetry", "1s", "--health-window", "0.3s",
                               "--http-port", "-1", "--log-level", "info"])

    def devices(self) -> dict[str, dict]:
        proc = subprocess.run([*EDGEML, "fleet", "devices", "--db", str(self.db), "--json"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return {}
        return {d["device_id"]: d for d in json.loads(proc.stdout)}

    def wait_online(self, ids: list[str], timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            devices = self.devices()
            if all(devices.get(i, {}).get("online") for i in ids):
                return
            time.sleep(0.5)
        raise AssertionError(f"devices {ids} not online after {timeout}s: {self.devices()}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.fixture
def fleet(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (Debian package mosquitto); .ci/run installs it")
    from edgeml.runtime.signing import generate_keypair

    key, pub = generate_keypair(tmp_path / "release.key")
    broker = Broker(tmp_path / "mosquitto", kind="mosquitto").start()
    f = Fleet(root=tmp_path, broker=broker, key=key, pub=pub, db=tmp_path / "fleet.db")
    try:
        yield f
    finally:
        f.stop()
        broker.stop()
