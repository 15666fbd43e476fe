"""A real 3-node nats-server cluster (routes + JetStream + MQTT gateway) on free loopback ports, for tests.

Never the system nats-server on 4222: every node gets its own client, route and MQTT ports and its own store.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeml.fleet.broker import free_port


def nats_binary() -> str | None:
    return shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server",) if Path(p).exists()), None)


@dataclass
class NatsNode:
    name: str
    client: int
    route: int
    mqtt: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt}"


@dataclass
class NatsCluster:
    workdir: Path
    binary: str
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        self.nodes = [NatsNode(f"n{i}", free_port(), free_port(), free_port()) for i in range(1, self.size + 1)]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route}" for n in self.nodes)
        for node in self.nodes:
            conf = self.workdir / f"{node.name}.conf"
            # stream_replicas 3: the MQTT gateway's JetStream streams (sessions, retained messages, QoS 1 queues)
            # keep a copy on every node, so losing one node loses none of them
            conf.write_text(
                f"listen: 127.0.0.1:{node.client}\nserver_name: {node.name}\n"
                f'jetstream {{ store_dir: "{self.workdir / node.name}" }}\n'
                f"cluster {{ name: edgeml, listen: 127.0.0.1:{node.route}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{node.mqtt}, stream_replicas: {min(3, self.size)} }}\n")
            with open(self.workdir / f"{node.name}.log", "ab") as log:
                node.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while not self._answers(node.mqtt):
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{self.log(node.name)[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {node.name} did not open MQTT port {node.mqtt}")
                time.sleep(0.1)
        # the MQTT gateway needs a JetStream meta leader before it accepts sessions
        while not any("metadata leader" in self.log(n.name) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the NATS cluster elected no JetStream leader:\n" + self.log("n1")[-2000:])
            time.sleep(0.1)
        return self

    def urls(self, first: int = 0) -> str:
        """Every node's MQTT URL, comma-separated, starting at node ``first`` (so clients spread over nodes)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    def kill(self, index: int) -> None:
        proc = self.nodes[index].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
