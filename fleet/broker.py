"""Start a private MQTT broker for tests and the demo.

Mosquitto when installed (``mosquitto -c <conf>`` on a free loopback port,
optionally with a password file and/or TLS), otherwise amqtt (pip extra
``demo``; MQTT 3.1.1 only) in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeml.errors import FleetError, MissingDependency


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.path.exists(p)), None)


@dataclass
class Broker:
    workdir: Path
    port: int = 0
    kind: str = "auto"                      # auto | mosquitto | amqtt
    users: dict[str, str] = field(default_factory=dict)
    tls: dict[str, Path] | None = None      # {"ca", "cert", "key"}; require_certificate when "require_client_cert"
    require_client_cert: bool = False
    persistence: bool = True
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Broker":
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        kind = self.kind
        if kind == "auto":
            kind = "mosquitto" if mosquitto_binary() else "amqtt"
        self.kind = kind
        log = open(self.workdir / f"{kind}.log", "ab")
        if kind == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise MissingDependency("mosquitto is not installed", hint="apt-get install mosquitto")
            cmd = [binary, "-c", str(self._mosquitto_conf())]
        else:
            cmd = [self._amqtt_binary(), "-c", str(self._amqtt_conf())]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise FleetError(f"{kind} exited with {self.proc.returncode}; see {self.workdir / (kind + '.log')}:\n"
                                     + (self.workdir / f"{kind}.log").read_text()[-2000:])
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return self
                except OSError:
                    time.sleep(0.05)
        except BaseException:      # e.g. SIGTERM while waiting (fleet/simulator_procs.py): never leave it running
            self.stop()
            raise
        self.stop()
        raise FleetError(f"{kind} did not open port {self.port} within {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)      # mosquitto saves its persistence file on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    # ------------------------------------------------------------ config files
    def _mosquitto_conf(self) -> Path:
        # max_queued_messages: Mosquitto queues 1,000 QoS 1 messages per client by default and DROPS the rest; the
        # manager's one connection receives the whole fleet's events, so a 10,000-device wave overflows it
        lines = [f"listener {self.port} 127.0.0.1", "max_packet_size 1048576", "max_queued_messages 100000"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # started as root mosquitto drops to user "mosquitto", which cannot read our private temp files
            lines.append("user root")
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(pw),
                                user, password], check=True, capture_output=True)
            os.chmod(pw, 0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}", f"keyfile {self.tls['key']}"]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.persistence:
            store = self.workdir / "mosquitto-data"
            store.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    @staticmethod
    def _amqtt_binary() -> str:
        exe = Path(sys.executable).with_name("amqtt")
        if exe.exists():
            return str(exe)
        found = shutil.which("amqtt")
        if not found:
            raise MissingDependency("no MQTT broker here: mosquitto is not installed and neither is amqtt",
                                    hint="apt-get install mosquitto, or pip install 'edgeml[demo]'")
        return found

    def _amqtt_conf(self) -> Path:
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "sys_interval: 0\nauth:\n  allow-anonymous: true\n  plugins: ['auth_anonymous']\n"
            "topic-check:\n  enabled: false\n"
        )
        return conf
