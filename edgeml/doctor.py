"""``edgeml doctor``: what this machine has for edgeml, in one table.

Host CPU and its best target, every backend and optional package (version or "missing" with the pip extra),
the system tools the tests use (each missing one names the tests that skip), the MQTT broker and the fleet
database reachability, PostgreSQL for the replica tests. Nothing is installed or changed; nothing heavy is
imported (versions come from package metadata).
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any
from urllib.parse import urlparse

import click

from edgeml.cli import emit, examples, handle_errors, json_option

PACKAGES = (   # (distribution, what it is for, pip extra)
    ("onnxruntime", "backend: ONNX Runtime (every device)", "edgeml"),
    ("openvino", "backend: OpenVINO (compile + serve)", "edgeml[compiler]"),
    ("apache-tvm", "backend: Apache TVM (compile + serve)", "edgeml[compiler]"),
    ("onnx", "compiler: ONNX import and INT8", "edgeml[compiler]"),
    ("nncf", "compiler: OpenVINO INT8", "edgeml[compiler]"),
    ("torch", "compiler: PyTorch models", "torch==2.13.0"),
    ("paho-mqtt", "fleet: MQTT client", "edgeml"),
    ("scipy", "fleet: drift and experiment statistics", "edgeml[fleet]"),
    ("psycopg", "fleet: PostgreSQL manager database", "edgeml[fleet-pg]"),
    ("grpcio", "serve: v2 gRPC", "edgeml[serve]"),
)
TOOLS = (      # (command, Debian package, what skips without it)
    ("mosquitto", "mosquitto", "fleet, stream and quick-start tests; edgeml fleet demo"),
    ("curl", "curl", "the quick-start tests (README, docs/quickstart-fleet.md)"),
    ("nats-server", "nats-server", "NATS cluster fail-over tests"),
    ("promtool", "prometheus", "Prometheus rule tests and the real scrape"),
    ("podman", "podman", "container image tests (deploy/)"),
    ("systemd-analyze", "systemd", "systemd unit verification"),
    ("qemu-aarch64-static", "qemu-user-static", "aarch64 emulation proof"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "TVM aarch64 cross-compiled artifacts"),
)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tcp(host: str, port: int, timeout: float = 1.0) -> str | None:
    """None when something accepts a TCP connection at host:port, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def checks(broker: str, db: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(area: str, name: str, ok: bool | None, detail: str) -> None:
        rows.append({"area": area, "check": name, "status": "ok" if ok else ("missing" if ok is False else "note"),
                     "detail": detail})

    from edgeml.targets import best_host_target, host_arch, host_features, host_targets

    try:
        best = best_host_target().name
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        best = f"none ({exc})"
    cpu = _cpu_model()
    add("host", "cpu", True, f"{host_arch()} {cpu}".strip())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "asimddp")
            if f in host_features()]
    add("host", "features", True, ", ".join(simd) or "baseline only")
    add("host", "targets", True, f"best {best}; runs {', '.join(t.name for t in host_targets())}")
    for dist, what, extra in PACKAGES:
        v = _version(dist)
        add("python", dist, v is not None, f"{v}  ({what})" if v else f"not installed: pip install '{extra}' ({what})")
    for cmd, pkg, skips in TOOLS:
        path = shutil.which(cmd)
        add("tools", cmd, path is not None, path or f"not installed (apt-get install {pkg}); these skip: {skips}")
    from edgeml.config import config_path

    cfg = config_path()
    add("config", "file", None, f"{cfg} (option defaults)" if cfg else "none (~/.config/edgeml/config.toml or"
                                                                         " $EDGEML_CONFIG would set option defaults)")
    add("fleet", "broker", *_broker_check(broker))
    add("fleet", "database", *_db_check(db))
    pg = _tcp("127.0.0.1", 5432)
    add("fleet", "postgresql 127.0.0.1:5432", pg is None,
        "answers (the PostgreSQL manager and replica tests use it)" if pg is None else
        f"{pg}: the PostgreSQL tests skip (docs/scale.md)")
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _broker_check(url: str) -> tuple[bool, str]:
    first = url.split(",")[0].strip()
    u = urlparse(first)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        return False, f"{first!r} is not an mqtt://HOST:PORT URL"
    port = u.port or (8883 if u.scheme in ("mqtts", "ssl") else 1883)
    reason = _tcp(u.hostname, port)
    if reason is None:
        return True, f"{u.hostname}:{port} accepts connections"
    return False, (f"{u.hostname}:{port}: {reason}; start Mosquitto (mosquitto -p {port} -d) or set $EDGEML_BROKER")


def _db_check(db: str) -> tuple[bool | None, str]:
    from edgeml.fleet.db_postgres import is_postgres_url, redact

    if is_postgres_url(db):
        u = urlparse(db)
        reason = _tcp(u.hostname or "127.0.0.1", u.port or 5432)
        return reason is None, f"{redact(db)}: " + ("answers" if reason is None else reason)
    if not os.path.exists(db):
        return None, f"{db} does not exist yet (edgeml fleet manager or fleet publish creates it)"
    from edgeml.errors import EdgemlError
    from edgeml.fleet.db import check_database

    try:
        check_database(db)
    except EdgemlError as exc:
        return False, exc.message
    return True, f"{db} is a fleet database"


@click.command("doctor", epilog=examples("edgeml doctor", "EDGEML_BROKER=mqtt://10.0.0.5:1883 edgeml doctor --json"))
@click.option("--broker", envvar="EDGEML_BROKER", show_envvar=True, default="mqtt://127.0.0.1:1883", show_default=True,
              help="The MQTT broker to try.")
@click.option("--db", envvar="EDGEML_FLEET_DB", show_envvar=True, default="fleet.db", show_default=True,
              help="The fleet database to check (SQLite file or postgresql:// URL).")
@json_option
@handle_errors
def doctor_cmd(broker: str, db: str, as_json: bool) -> None:
    """Check this machine: CPU and targets, backends and packages, test tools, broker and database."""
    rows = checks(broker, db)

    def human(rows: list[dict[str, Any]]) -> str:
        from edgeml.cli_format import table

        mark = {"ok": "ok", "missing": "MISSING", "note": "-"}
        out = table([("AREA", "CHECK", "STATUS", "DETAIL")] +
                    [(r["area"], r["check"], mark[r["status"]], r["detail"]) for r in rows])
        missing = sum(r["status"] == "missing" for r in rows)
        return "\n".join(out + ["", f"{missing} missing (each line says what it is for and how to get it)"
                                if missing else "everything edgeml and its tests use is here"])

    emit(rows, as_json, human)
