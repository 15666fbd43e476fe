"""CLI of fleet monitoring: ``edgeml fleet drift`` and the manager's ``--metrics-port`` / ``--alert-webhook``.

Registered on the ``edgeml fleet`` group by ``register`` (fleet/cli.py) so that file only
gains two lines. Reads go to the manager's database directly, like the other read commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgeml.cli import PortType, emit, examples, handle_errors, json_option


def _human(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return "no drift windows received in this time range (agents send them with their telemetry)"
    lines = [f"{'MODEL@VERSION':<28} {'GROUP':<18} {'DRIFTED':<8} {'SCORE':>7} {'P':>9} {'WINDOWS':>7} {'SAMPLES':>8}  TOP"]
    for r in reports:
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        p = "-" if r["p_value"] is None else f"{r['p_value']:.2g}"
        top = ", ".join(f"{c['name']} {c['psi']:.2f}" for c in r["top"][:3]) or (r["reason"] or "")
        lines.append(f"{r['target']:<28} {r['group']:<18} {str(r['drifted']).lower():<8} {score:>7} {p:>9}"
                     f" {r['windows']:>7} {r['samples']:>8}  {top}")
    return "\n".join(lines)


@click.command("drift", epilog=examples(
    "edgeml fleet drift", "edgeml fleet drift --model digits-cnn --window 6h --by label:site --json"))
@click.option("--db", help="The manager's database (SQLite file or postgresql:// URL; default $EDGEML_FLEET_DB or fleet.db).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact store folder (default: beside the db), where the reference profiles are read.")
@click.option("--model", help="Only this model (name).")
@click.option("--window", default="1h", show_default=True, help="Windows received in this time range.")
@click.option("--by", default="version", show_default=True,
              help="version | device | label:KEY (a cohort: devices sharing the value of label KEY).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01, show_default=True,
              help="Family-wise error rate (Holm over all columns of a version).")
@click.option("--min-psi", type=click.FloatRange(0, 100), default=0.1, show_default=True,
              help="Smallest drift score (PSI) reported as drifted.")
@json_option
@handle_errors
def drift_cmd(db, store_dir, model, window, by, alpha, min_psi, as_json):
    """Drift per model@version: score (max PSI), Holm p-value, top drifting features, drifted: true|false."""
    from edgeml.errors import UsageError
    from edgeml.fleet.cli import _db_path
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.drift import Settings, analyze
    from edgeml.fleet.waves import bounded_duration

    if by not in ("version", "device") and not (by.startswith("label:") and len(by) > 6):
        raise UsageError(f"--by {by!r} is not version, device or label:KEY", hint="e.g. --by label:site")
    window_s = bounded_duration(window, "--window", min_s=1, max_s=90 * 86400)
    path = _db_path(db)
    fdb = FleetDB(path, readonly=True)
    store = Path(store_dir) if store_dir else _default_store(path)
    reports = analyze(fdb, store, model=model, window_s=window_s, by=by,
                      settings=Settings(alpha=alpha, min_psi=min_psi))
    out = [r.to_dict() for r in reports]
    emit({"window_s": window_s, "alpha": alpha, "min_psi": min_psi, "reports": out} if as_json else out,
         as_json, lambda o: _human(o))


def _default_store(db: Any) -> Path | None:
    text = str(db)
    if "://" in text:
        return None
    p = Path(text)
    return p.with_name(p.stem + "-store")


# ----------------------------------------------------------------------------- manager options
MANAGER_OPTIONS = [
    click.option("--metrics-port", type=PortType(), default=None,
                 help="Serve Prometheus /metrics for the fleet on this port (0: a free one). Default: off."),
    click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of /metrics."),
    click.option("--alert-webhook", default=None, callback=lambda ctx, param, value: _webhook(value),
                 help="POST alerts (Alertmanager webhook JSON) to this http(s) URL when they fire and resolve."),
    click.option("--alert-interval", default="30s", show_default=True, help="How often alerts are evaluated."),
]


def _webhook(url: str | None) -> str | None:
    from edgeml.errors import UsageError
    from edgeml.fleet.alerts import check_webhook_url

    try:
        return check_webhook_url(url) if url else None
    except UsageError as exc:
        raise click.BadParameter(f"{exc.message} ({exc.hint})") from None


def manager_options(func: Any) -> Any:
    for opt in reversed(MANAGER_OPTIONS):
        func = opt(func)
    return func


class Monitoring:
    """What ``edgeml fleet manager`` runs beside the manager: /metrics and the webhook notifier."""

    def __init__(self, db: Any, store_root: Path | None, kw: dict[str, Any]):
        from edgeml.fleet.waves import bounded_duration

        port, host = kw.pop("metrics_port", None), kw.pop("metrics_host", "127.0.0.1")
        webhook, interval = kw.pop("alert_webhook", None), kw.pop("alert_interval", "30s")
        self.server = self.notifier = None
        if port is not None:
            from edgeml.fleet.db import FleetDB
            from edgeml.fleet.prometheus import FleetMetrics, MetricsServer

            self.server = MetricsServer(FleetMetrics(FleetDB(db, readonly=True), store_root), host, port).start()
        if webhook:
            from edgeml.fleet.alerts import Notifier
            from edgeml.fleet.db import FleetDB

            self.notifier = Notifier(FleetDB(db, readonly=True), store_root, webhook,
                                     interval_s=bounded_duration(interval, "--alert-interval", min_s=1, max_s=86400)).start()

    @property
    def metrics_url(self) -> str | None:
        return self.server.url if self.server else None

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        if self.notifier:
            self.notifier.stop()


def register(group: click.Group) -> None:
    group.add_command(drift_cmd)
