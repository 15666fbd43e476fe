"""``edgeml agent`` and ``edgeml fleet ...``: thin click layer over edgeml.fleet.

The CLI talks to a running manager through the ``commands`` table of the
manager's SQLite file (see edgeml.fleet.service.CommandClient); reads go to
the database directly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgeml.errors import EdgemlError
from edgeml.fleet.profiles import apply_profile, profile_option

from edgeml.cli import (AliasedOption, check_trusted_keys, emit, examples, handle_errors, json_option, log_level_option, port_in_use,
                        port_option)
from edgeml.fleet.monitor_cli import Monitoring, manager_options, register as register_monitoring

if TYPE_CHECKING:
    from edgeml.fleet.transport import BrokerConfig

DB_HELP = ("The manager's database: an SQLite file, or postgresql://USER@HOST:PORT/DB for replicas"
           " (default $EDGEML_FLEET_DB or fleet.db).")
MIN_INTERVAL_S = 0.5     # heartbeat / telemetry: faster would flood the broker (0s sent 17,000 messages in 5 s)


def _setup_logging(level: str, fmt: str = "text") -> None:
    """One log format for every edgeml process: the model server's (``HH:MM:SS level message key=value``);
    JSON lines with --log-format json (EDGEML_LOG_FORMAT)."""
    import sys

    from edgeml.runtime.server.logs import JsonFormatter, TextFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def broker_options(func):
    opts = [
        click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, envvar="EDGEML_BROKER",
                     show_envvar=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT (several, comma-separated: a"
                                            " cluster's nodes)."),
        click.option("--username", help="MQTT username."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), help="File holding the MQTT password."),
        click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), help="CA certificate (enables TLS)."),
        click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="Client certificate."),
        click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Client key."),
        click.option("--mqtt-protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
                     help="auto = MQTT 5, falling back to 3.1.1."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _broker(kw) -> "BrokerConfig":
    from edgeml.fleet.transport import BrokerConfig, read_password_file

    return BrokerConfig(url=kw.pop("broker"), username=kw.pop("username"),
                        password=read_password_file(kw.pop("password_file")), tls_ca=kw.pop("tls_ca"),
                        tls_cert=kw.pop("tls_cert"), tls_key=kw.pop("tls_key"), protocol=kw.pop("mqtt_protocol"))


class _DbParam(click.ParamType):
    """--db: an SQLite path (a Path) or a postgresql:// URL (kept as text: a Path would fold its '//')."""

    name = "FILE|URL"

    def convert(self, value, param, ctx):
        from edgeml.fleet.db_postgres import is_postgres_url

        if isinstance(value, Path) or is_postgres_url(value):
            return value
        return click.Path(dir_okay=False, path_type=Path).convert(value, param, ctx)


DB_TYPE = _DbParam()


def _db_path(db: Path | str | None) -> Path | str:
    from edgeml.fleet.db_postgres import is_postgres_url

    value = db or os.environ.get("EDGEML_FLEET_DB") or "fleet.db"
    return value if is_postgres_url(value) else Path(value)


def _connected_or_exit(transport, timeout_s: float, stop) -> None:
    """--connect-timeout: wait for the broker's CONNACK; else stop and exit 10 naming the last failure."""
    from edgeml.errors import FleetError

    if transport.wait_connected(timeout_s):
        return
    reason = transport.last_error or "no answer"
    stop()
    raise FleetError(f"cannot reach the MQTT broker {transport.host}:{transport.port} within {timeout_s:g}s: {reason}",
                     hint="check --broker (or $EDGEML_BROKER), that the broker runs, and credentials/TLS files")


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.is_set():
        done.wait(1.0)


# ====================================================================== agent
@click.command("agent", epilog=examples(
    "edgeml agent --device-id cam-1 --state-dir /var/lib/edgeml --trusted-key signing.key.pub",
    "EDGEML_BROKER=mqtt://10.0.0.5:1883 edgeml agent --device-id cam-2 --labels site=lab --state-dir st2 \\",
    "    --trusted-key signing.key.pub --port 8102 --profile lab --connect-timeout 30s",
    "(docs/quickstart-fleet.md walks a manager and two agents on one machine)"))
@broker_options
@click.option("--device-id", required=True, envvar="EDGEML_DEVICE_ID", show_envvar=True,
              help="This device's id (letters, digits, _ . -).")
@click.option("--labels", default="", help="k=v,k2=v2 labels the manager selects on (host-target=<this host's best"
                                           " CPU target> is added unless given: rollouts check artifacts against it).")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Journal + slots.")
@click.option("--trusted-key", "trusted_keys", multiple=True, envvar="EDGEML_TRUSTED_KEYS", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Public key artifacts (and manager messages) must be signed with; repeatable.")
@click.option("--allow-unsigned", is_flag=True, help="Accept unsigned artifacts and messages (development only).")
@click.option("--host", "--http-host", "http_host", cls=AliasedOption, hidden_aliases=("--http-host",),
              default="127.0.0.1", show_default=True, help="Where the embedded model server listens.")
@port_option("--port", hidden_aliases=("--http-port",), dest="http_port", default=8000, off="no HTTP server",
             help="The embedded KServe v2 model server's port (0: a free one, -1: no HTTP server).")
@click.option("--connect-timeout", default=None,
              help="Exit (code 10) when the broker is not reached within this time, e.g. 30s (default: keep"
                   " retrying; failures are logged at WARNING).")
@click.option("--heartbeat", default="10s", show_default=True, help="Heartbeat interval (a duration: 500ms, 10s, 5m).")
@click.option("--telemetry", "telemetry_every", default="10s", show_default=True, help="Telemetry interval.")
@click.option("--health-window", default="10s", show_default=True, help="Default health window after a swap.")
@click.option("--health-max-error-rate", type=float, default=0.0, show_default=True,
              help="Share of failed probes in the health window that rolls back.")
@click.option("--health-max-p95-ms", type=float, default=None, help="Roll back when the probes' p95 exceeds this.")
@click.option("--drift-rate", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Share of live requests sampled into the drift sketch (off the request path; docs/monitoring.md).")
@click.option("--admin-token", envvar="EDGEML_ADMIN_TOKEN", default=None,
              help="Turn on the embedded server's repository API (load/unload) behind this bearer token"
                   " (also $EDGEML_ADMIN_TOKEN). Default: off, repository endpoints answer 403.")
@log_level_option
@profile_option
@json_option
@handle_errors
def agent_cmd(device_id, labels, state_dir, trusted_keys, allow_unsigned, http_host, http_port, connect_timeout, heartbeat,
              telemetry_every, health_window, health_max_error_rate, health_max_p95_ms, admin_token, log_level,
              log_format, as_json, **kw):
    """Run the device agent: reconcile the desired model, serve it, report."""
    timing = apply_profile(kw.pop("profile"), "agent", {"heartbeat": heartbeat, "telemetry_every": telemetry_every,
                                                        "health_window": health_window})
    heartbeat, telemetry_every, health_window = timing["heartbeat"], timing["telemetry_every"], timing["health_window"]
    from edgeml.errors import UsageError
    from edgeml.fleet.agent import Agent, AgentConfig
    from edgeml.fleet.waves import bounded_duration
    from edgeml.fleet.protocol import check_device_id, parse_labels
    from edgeml.fleet.rollout_cli import HOST_TARGET_LABEL
    from edgeml.fleet.serving import make_serving
    from edgeml.targets import best_host_target
    from edgeml.runtime.signing import load_public_key

    _setup_logging(log_level, log_format)
    broker = _broker(kw)
    check_device_id(device_id)
    labels = parse_labels(labels)
    if HOST_TARGET_LABEL not in labels:    # what `rollout start` checks an artifact's target against
        try:
            labels[HOST_TARGET_LABEL] = best_host_target().name
        except EdgemlError:
            pass
    if not trusted_keys and not allow_unsigned:
        raise UsageError("the agent needs --trusted-key PUB (or --allow-unsigned for development)",
                         hint="create a key pair with: edgeml keygen KEY; pass KEY.pub here and sign with KEY")
    for key in trusted_keys:       # a missing or wrong key would make every install fail later: refuse now
        load_public_key(key)
    if not 0.0 <= health_max_error_rate <= 1.0:
        raise UsageError(f"--health-max-error-rate {health_max_error_rate} must be between 0 and 1")
    if health_max_p95_ms is not None and not 0 < health_max_p95_ms < 1e7:
        raise UsageError(f"--health-max-p95-ms {health_max_p95_ms} must be a positive number of milliseconds")
    connect_timeout_s = None if connect_timeout is None else bounded_duration(connect_timeout, "--connect-timeout",
                                                                               min_s=0.1, max_s=86400)
    config = AgentConfig(device_id=device_id, state_dir=state_dir, labels=labels,
                         trusted_keys=list(trusted_keys), allow_unsigned=allow_unsigned,
                         heartbeat_s=bounded_duration(heartbeat, "--heartbeat", min_s=MIN_INTERVAL_S, max_s=3600),
                         telemetry_s=bounded_duration(telemetry_every, "--telemetry", min_s=MIN_INTERVAL_S, max_s=3600),
                         health_window_s=bounded_duration(health_window, "--health-window", min_s=0, max_s=3600),
                         health_max_error_rate=health_max_error_rate, health_max_p95_ms=health_max_p95_ms)
    try:
        serving = make_serving(Path(state_dir) / "cache", http_host=http_host,
                               http_port=None if http_port < 0 else http_port, admin_token=admin_token,
                               drift_rate=kw.pop("drift_rate"))
    except (OSError, EdgemlError) as exc:
        raise port_in_use(exc, "--port", http_port) or exc from None
    if serving.address:
        config.endpoint = f"http://{serving.address[0]}:{serving.address[1]}"
    agent = Agent(config, broker, serving).start()
    if connect_timeout_s is not None:
        _connected_or_exit(agent.transport, connect_timeout_s, agent.stop)
    info = {"device_id": device_id, "broker": broker.url, "state_dir": str(state_dir), "labels": config.labels,
            "http": f"http://{serving.address[0]}:{serving.address[1]}" if serving.address else None,
            "active": agent.core.active(), "pid": os.getpid()}
    def banner(i: dict) -> str:
        active = i["active"] or {}
        model = f"{active['name']}@{active['version']}" if active.get("name") else "no model yet (waiting for a rollout)"
        return (f"agent {i['device_id']} (pid {i['pid']}) -> {i['broker']}; serving {model}"
                f" {('at ' + i['http']) if i['http'] else '(no HTTP)'}")

    emit(info, as_json, banner)
    try:
        _wait_for_signal()
    finally:
        agent.stop()


# ====================================================================== fleet
@click.group("fleet")
def fleet_group() -> None:
    """Operate a fleet: manager, artifacts, devices, rollouts, telemetry, demo."""


@fleet_group.command("manager", epilog=examples(
    "edgeml fleet manager --db fleet.db --sign-key signing.key",
    "edgeml fleet manager --db postgresql://edgeml@db:5432/fleet --port 8765 --public-url http://mgr:8765",
    "(docs/quickstart-fleet.md: manager, signed artifact, two agents, a rollout)"))
@broker_options
@click.option("--db", type=DB_TYPE, help=DB_HELP)
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact store folder (default: beside the db).")
@click.option("--host", "--http-host", "http_host", cls=AliasedOption, hidden_aliases=("--http-host",),
              default="127.0.0.1", show_default=True, help="Where the artifact HTTP server listens.")
@port_option("--port", hidden_aliases=("--http-port",), dest="http_port", default=8765,
             help="The artifact HTTP server's port, which devices download from (0: a free one).")
@click.option("--connect-timeout", default=None,
              help="Exit (code 10) when the broker is not reached within this time, e.g. 30s (default: keep"
                   " retrying; failures are logged at WARNING).")
@click.option("--public-url", help="URL devices use for the artifact server (default http://HOST:PORT).")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), help="Sign desired-state messages.")
@click.option("--heartbeat-timeout", default="30s", show_default=True,
              help="A device silent this long is marked offline.")
@click.option("--offline-timeout", default="5m", show_default=True, help="Offline devices in a wave: pending this long.")
@click.option("--health-window", default="10s", show_default=True, help="Health window agents run after a swap.")
@log_level_option
@manager_options
@profile_option
@json_option
@handle_errors
def manager_cmd(db, store_dir, http_host, http_port, connect_timeout, public_url, sign_key, heartbeat_timeout, offline_timeout,
                health_window, log_level, log_format, as_json, **kw):
    """Run the fleet manager (long-running)."""
    timing = apply_profile(kw.pop("profile"), "manager", {"heartbeat_timeout": heartbeat_timeout,
                                                          "offline_timeout": offline_timeout,
                                                          "health_window": health_window})
    heartbeat_timeout, offline_timeout, health_window = (timing["heartbeat_timeout"], timing["offline_timeout"],
                                                         timing["health_window"])
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.waves import bounded_duration, parse_duration

    _setup_logging(log_level, log_format)
    config = ManagerConfig(db=_db_path(db), store_dir=store_dir, http_host=http_host, http_port=http_port,
                           public_url=public_url, sign_key=sign_key,
                           heartbeat_timeout_s=parse_duration(heartbeat_timeout),
                           offline_timeout_s=parse_duration(offline_timeout),
                           health_window_s=parse_duration(health_window))
    connect_timeout_s = None if connect_timeout is None else bounded_duration(connect_timeout, "--connect-timeout",
                                                                               min_s=0.1, max_s=86400)
    try:
        svc = ManagerService(config, _broker(kw)).start()
    except (OSError, EdgemlError) as exc:
        raise port_in_use(exc, "--port", http_port) or exc from None
    if connect_timeout_s is not None:
        _connected_or_exit(svc.transport, connect_timeout_s, svc.stop)
    metrics_port = kw.get("metrics_port")
    try:
        monitoring = Monitoring(config.db, config.store_path(), kw)   # /metrics + alert webhook (fleet/monitor_cli.py)
    except (OSError, EdgemlError) as exc:
        svc.stop()
        raise (port_in_use(exc, "--metrics-port", metrics_port) if metrics_port is not None else None) or exc from None
    emit({"db": str(config.db), "artifacts": svc.server.base_url, "broker": svc.broker.url, "pid": os.getpid(),
          "metrics": monitoring.metrics_url}, as_json,
         lambda i: f"manager (pid {i['pid']}): db {i['db']}, artifacts at {i['artifacts']}, broker {i['broker']}"
                   + (f", metrics at {i['metrics']}" if i["metrics"] else ""))
    try:
        _wait_for_signal()
    finally:
        monitoring.stop()
        svc.stop()


@fleet_group.command("publish", epilog=examples(
    "edgeml fleet publish digits.edgepkg --trusted-key signing.key.pub",
    "edgeml fleet artifacts          # what is published"))
@click.argument("artifact", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--db", type=DB_TYPE, help=DB_HELP)
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact store folder (default: beside the db; the manager's --store).")
@click.option("--trusted-key", "trusted_keys", multiple=True, envvar="EDGEML_TRUSTED_KEYS", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Refuse the artifact unless signed by one of these keys.")
@json_option
@handle_errors
def publish_cmd(artifact, db, store_dir, trusted_keys, as_json):
    """Verify ARTIFACT and add it to the content-addressed store."""
    from edgeml.fleet.db import FleetDB, check_database
    from edgeml.fleet.manager import ManagerConfig, register_artifact
    from edgeml.fleet.service import default_actor
    from edgeml.fleet.store import ArtifactStore

    check_trusted_keys(trusted_keys)
    config = ManagerConfig(db=_db_path(db), store_dir=store_dir)
    check_database(config.db)     # a wrong --db is refused before the artifact is copied anywhere
    rec = ArtifactStore(config.store_path()).publish(artifact, trusted_keys=list(trusted_keys))
    fdb = FleetDB(config.db)
    register_artifact(fdb, rec, default_actor(), time.time())
    emit(rec, as_json, lambda r: f"published {r['name']}@{r['version']} sha256 {r['sha256'][:16]}... ({r['size']} bytes,"
                                 f" {'signed' if r['signed'] else 'UNSIGNED'})")


@fleet_group.group("devices", invoke_without_command=True,
                   epilog=examples("edgeml fleet devices", "edgeml fleet devices --selector site=lab --json",
                                   "edgeml fleet devices --wait-online 2 --timeout 60s",
                                   "edgeml fleet devices forget cam-007"))
@click.option("--db", type=DB_TYPE, help=DB_HELP)
@click.option("--selector", default="", help="k=v,... labels to match.")
@click.option("--wait-online", type=click.IntRange(1, 1_000_000), default=None, metavar="N",
              help="First wait until at least N matching devices are online (exit 10 after --timeout).")
@click.option("--timeout", default="2m", show_default=True, help="With --wait-online: how long to wait.")
@json_option
@click.pass_context
@handle_errors
def devices_cmd(ctx, db, selector, wait_online, timeout, as_json):
    """List registered devices (or forget one: devices forget ID)."""
    if ctx.invoked_subcommand is not None:
        return
    from edgeml.errors import FleetError
    from edgeml.fleet.protocol import parse_labels
    from edgeml.fleet.waves import parse_duration

    sel = parse_labels(selector)
    timeout_s = parse_duration(timeout)
    rows = _device_rows(_db_path(db), sel)
    deadline = time.monotonic() + timeout_s
    while wait_online is not None and sum(d["online"] for d in rows) < wait_online:
        if time.monotonic() > deadline:
            online = sum(d["online"] for d in rows)
            raise FleetError(f"{online} of the {wait_online} device(s) wanted are online after {timeout}"
                             f" ({len(rows)} registered{' matching ' + selector if selector else ''})",
                             hint="check that the agents run and reach the same broker as the manager")
        time.sleep(0.5)
        rows = _device_rows(_db_path(db), sel)

    def human(rows):
        from edgeml.cli_format import table

        out = [("DEVICE", "ONLINE", "ACTIVE", "STATE", "ENDPOINT", "LABELS")]
        out += [(d["device_id"], "yes" if d["online"] else "no", d["active"] or "-", d["state"] or "-",
                 d["endpoint"] or "-", ",".join(f"{k}={v}" for k, v in d["labels"].items())) for d in rows]
        return "\n".join(table(out) + [f"{len(rows)} device(s)"])

    emit(rows, as_json, human)


def _device_rows(db_path, sel: dict) -> list[dict]:
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.protocol import selector_matches
    from edgeml.fleet.resilience import latest

    rows = []
    fdb = FleetDB(db_path, readonly=True)
    try:
        resilience = latest(fdb)
        for r in fdb.q("SELECT * FROM devices ORDER BY device_id"):
            labels = json.loads(r["labels"])
            if not selector_matches(sel, labels):
                continue
            active = json.loads(r["active"]) if r["active"] else None
            rows.append({"device_id": r["device_id"], "online": bool(r["online"]), "labels": labels,
                         "endpoint": r["endpoint"],
                         "active": f"{active['name']}@{active['version']}" if active and active.get("name") else None,
                         "active_detail": active,   # the protocol's object (docs/fleet-protocol.md)
                         "committed_seq": r["committed_seq"], "state": r["state"], "last_seen": r["last_seen"],
                         "refused_messages": r["refused"],
                         "last_failed": json.loads(r["last_failed"]) if r["last_failed"] else None,
                         "resilience": resilience.get(r["device_id"], {})})
    finally:
        fdb.close()
    return rows


@devices_cmd.command("forget", epilog=examples("edgeml fleet devices forget cam-007"))
@click.argument("device_id")
@click.option("--db", type=DB_TYPE, help=DB_HELP)
@json_option
@handle_errors
def devices_forget_cmd(device_id, db, as_json):
    """Remove an offline DEVICE_ID (decommissioned, renamed) from the device list and its telemetry.

    Its rollout and audit history stay. A forgotten device that connects again registers anew."""
    from edgeml.errors import FleetError
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.service import default_actor
    from edgeml.fleet.states import RolloutState

    fdb = FleetDB(_db_path(db), readonly=True)
    try:
        row = fdb.one("SELECT online FROM devices WHERE device_id = ?", (device_id,))
        if row is None:
            known = [r["device_id"] for r in fdb.q("SELECT device_id FROM devices ORDER BY device_id")]
            import difflib

            close = difflib.get_close_matches(device_id, known, n=3)
            raise FleetError(f"no device {device_id!r} is registered",
                             hint=f"did you mean {' or '.join(close)}?" if close else "list them: edgeml fleet devices")
        if row["online"]:
            raise FleetError(f"device {device_id} is online: forgetting it would only last until its next heartbeat",
                             hint="stop its agent first (a device is offline after the manager's --heartbeat-timeout)")
        active = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)
        busy = fdb.q("SELECT r.id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id"
                     f" WHERE rd.device_id = ? AND r.state IN ({','.join('?' * len(active))})",
                     (device_id, *[str(s) for s in active]))
        if busy:
            raise FleetError(f"device {device_id} is in active rollout(s) {sorted(r['id'] for r in busy)}",
                             hint="wait for them to end, or abort them first")
        with fdb.tx() as tx:
            for table in ("devices", "device_telemetry", "telemetry"):
                tx.conn.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))
        fdb.audit(time.time(), default_actor(), "device.forget", device_id)
    finally:
        fdb.close()
    emit({"forgotten": device_id}, as_json, lambda r: f"forgot device {r['forgotten']}")


@fleet_group.command("telemetry", epilog=examples(
    "edgeml fleet telemetry", "edgeml fleet telemetry --device cam-1 --json"))
@click.option("--db", type=DB_TYPE, help=DB_HELP)
@click.option("--device", help="Only this device.")
@json_option
@handle_errors
def telemetry_cmd(db, device, as_json):
    """Latest telemetry per device and per model version (merged histograms)."""
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.metrics import merge, quantile, stored_buckets

    fdb = FleetDB(_db_path(db), readonly=True)
    where, args = ("WHERE device_id = ?", (device,)) if device else ("", ())
    devices = [dict(r) for r in fdb.q(f"SELECT * FROM device_telemetry {where} ORDER BY device_id", args)]
    models = [dict(r) for r in fdb.q(f"SELECT * FROM telemetry {where} ORDER BY name, version, device_id", args)]
    by_version: dict[str, dict] = {}
    for m in models:
        m["buckets"] = stored_buckets(m["buckets"])
        v = by_version.setdefault(f"{m['name']}@{m['version']}", {"requests": 0, "failures": 0, "devices": 0, "h": []})
        v["requests"] += m["requests"]
        v["failures"] += m["failures"]
        v["devices"] += 1
        v["h"].append(m["buckets"])
    versions = {}
    for k, v in by_version.items():
        h = merge(v.pop("h"))
        versions[k] = {**v, "p50_ms_le": quantile(h, 0.5), "p95_ms_le": quantile(h, 0.95), "buckets": h}
    from edgeml.fleet.resilience import latest, summary

    resilience = latest(fdb, device)      # {device: {name@version: breaker/admission/fallback state}}
    for d in devices:
        d["active"] = json.loads(d["active"]) if d["active"] else None
        d["resilience"] = resilience.get(d["device_id"], {})
    out = {"devices": devices, "versions": versions}

    def human(o):
        lines = [f"{'DEVICE':<20} {'ACTIVE':<20} {'CPU%':>6} {'MEM MB':>8} {'REQ/S':>7}"]
        for d in o["devices"]:
            a = d["active"]
            lines.append(f"{d['device_id']:<20} {(a['name'] + '@' + a['version']) if a else '-':<20} "
                         f"{d['cpu_percent'] or 0:>6.1f} {d['memory_mb'] or 0:>8.1f} {d['throughput_rps'] or 0:>7.1f}"
                         f"{'  (stubbed model)' if d['stubbed'] else ''}")
            lines += [f"  {model:<30} {summary(row)}" for model, row in d["resilience"].items()]
        lines.append("")
        for k, v in o["versions"].items():
            lines.append(f"{k:<24} devices={v['devices']} requests={v['requests']} failures={v['failures']} "
                         f"p50<={v['p50_ms_le']} ms p95<={v['p95_ms_le']} ms")
        return "\n".join(lines)

    emit(out, as_json, human)


@fleet_group.command("demo", epilog=examples(
    "edgeml fleet demo", "edgeml fleet demo --scenario drift", "edgeml fleet demo --scenario experiment"))
@click.option("--broker-kind", type=click.Choice(["auto", "mosquitto", "amqtt"]), default="auto", show_default=True,
              help="The demo's own broker: Mosquitto when installed (auto), else amqtt (pip extra 'demo').")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep files here (default: temp).")
@click.option("--bake", default="3s", show_default=True, help="Bake time after each wave (a duration).")
@click.option("--scenario", type=click.Choice(["rollout", "experiment", "drift"]), default="rollout", show_default=True,
              help="experiment: shadow agreement, then an A/B test to its decision and promotion (fleet/demo_experiment.py);"
                   " drift: clean vs shifted digits, drift detected and its alert posted to a webhook (fleet/demo_drift.py).")
@json_option
@handle_errors
def demo_cmd(broker_kind, workdir, bake, scenario, as_json):
    """Broker + manager + agents on this machine. rollout: v1, canary v2, telemetry, broken v3 rolled back;
    experiment: shadow, A/B to a decision, an arm alert; drift: clean vs shifted digits, the drift alert."""
    from edgeml.fleet.demo import run_demo
    from edgeml.fleet.waves import parse_duration

    if scenario == "experiment":
        from edgeml.fleet.demo_experiment import run_experiment_demo

        out = run_experiment_demo(broker_kind=broker_kind, workdir=workdir,
                                  echo=(lambda s: None) if as_json else click.echo)
        emit(out, as_json, lambda o: f"demo finished in {o['seconds']:.1f}s: A/B {o['ab']['decision']['decision']}"
             f" (p={o['ab']['test']['p_value']:.3g})")
        return
    if scenario == "drift":
        from edgeml.fleet.demo_drift import run_drift_demo

        out = run_drift_demo(broker_kind=broker_kind, workdir=workdir, echo=(lambda s: None) if as_json else click.echo)
        emit(out, as_json, lambda o: f"demo finished in {o['seconds']:.1f}s: clean drifted={o['clean']['drifted']},"
             f" shifted drifted={o['shifted']['drifted']} (p={o['shifted']['p_value']:.3g}), alert posted")
        return

    summary = run_demo(broker_kind=broker_kind, workdir=workdir, bake_s=parse_duration(bake),
                       echo=(lambda s: None) if as_json else click.echo)
    emit(summary, as_json, lambda s: f"demo finished in {s['seconds']:.1f}s: " + "; ".join(
        f"{r['target']} {r['state']}" for r in s["rollouts"]))


@fleet_group.command("simulate", epilog=examples(
    "edgeml fleet simulate --devices 500", "edgeml fleet simulate --devices 2000 --fail 5% --waves 1%,10%,100%"))
@click.option("--devices", default=500, show_default=True, help="Simulated devices (model run stubbed).")
@click.option("--fail", "fail_rate", default="20%", show_default=True, help="Share of devices whose v2 self-test fails.")
@click.option("--waves", default="5%,25%,100%", show_default=True, help="Cumulative wave sizes.")
@click.option("--bake", default="0.5s", show_default=True, help="Bake time after each wave (a duration).")
@click.option("--processes", type=click.IntRange(0, 64), default=None,
              help="Simulator child processes (default: every core but one, at most 4; 0: in the manager's process).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep files here (default: temp).")
@json_option
@handle_errors
def simulate_cmd(devices, fail_rate, waves, bake, processes, workdir, as_json):
    """Roll v1 then a partly failing v2 over simulated devices; print how long each took and where the CPU went
    (manager, simulator, broker). The same run as benchmarks/fleet_scale.py. SIGTERM/SIGINT stop every child."""
    import sys

    from edgeml.fleet.waves import parse_duration, parse_rate, parse_waves
    from edgeml.fleet.simulator import run_simulation, where_time_went
    from edgeml.fleet.simulator_procs import Terminated

    if not 1 <= devices <= 100_000:
        raise click.BadParameter("must be 1..100000", param_hint="--devices")
    try:
        out = run_simulation(devices=devices, fail_fraction=parse_rate(fail_rate), waves=parse_waves(waves),
                             bake_s=parse_duration(bake), workdir=workdir, processes=processes,
                             echo=(lambda s: None) if as_json else click.echo)
    except Terminated as exc:
        click.echo(f"{exc}: broker, manager and simulator processes stopped", err=True)
        sys.exit(128 + exc.signum)
    emit(out, as_json, lambda o: "simulation done\n" + "\n".join(
        f"{r['target']} {r['state']}: {where_time_went(r, o['devices'])}" for r in o["rollouts"]))


register_monitoring(fleet_group)   # edgeml fleet drift (fleet/monitor_cli.py)
from edgeml.fleet.rollout_cli import register as register_rollouts  # noqa: E402

register_rollouts(fleet_group)      # edgeml fleet rollout / artifacts (fleet/rollout_cli.py)
from edgeml.fleet.experiment_cli import register as register_experiments  # noqa: E402

register_experiments(fleet_group)   # edgeml fleet experiment (fleet/experiment_cli.py)
