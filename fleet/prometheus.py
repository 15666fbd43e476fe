"""The manager's Prometheus ``/metrics``: the fleet as series (text exposition format 0.0.4).

Read from the manager's database at scrape time (so it is right after a manager restart):
devices online/offline, active versions, per model@version request/failure counters and the
merged latency histogram, rollout state and progress, gate values, and per model@version drift
(score, Holm p-value, drifted, samples; recomputed at most every ``drift_every_s``), and the
experiment arms (fleet/prometheus_experiments.py).
deploy/prometheus/alerts.yml alerts on these names; deploy/grafana/edgeml-fleet.json plots them.
Served by ``MetricsServer`` (loopback by default; ``edgeml fleet manager --metrics-port``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterable

from edgeml.fleet.httpbg import BackgroundHTTPServer

log = logging.getLogger("edgeml.fleet.prometheus")
ACTIVE_ROLLOUT_STATES = ("running", "paused", "rolling_back")
MAX_SERIES_DEVICES = 10_000          # per-device series beyond this are left out (the totals stay exact)


def _esc(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float | int | None) -> str:
    if v is None:
        return "NaN"
    return repr(float(v)) if isinstance(v, float) else str(v)


# serve_forever notices shutdown() only between polls (0.5 s by default): SIGTERM took that long per server
SHUTDOWN_POLL_S = 0.05

class _Family:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[str, dict[str, object], float | int | None]] = []

    def add(self, value: float | int | None, suffix: str = "", **labels: object) -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            out.append(f"{self.name}{suffix}{{{lab}}} {_num(value)}" if lab else f"{self.name}{suffix} {_num(value)}")
        return out


class FleetMetrics:
    """Builds the exposition text from a FleetDB; drift results are cached between scrapes."""

    def __init__(self, db: Any, store_root: Path | None, *, drift_every_s: float = 30.0, clock=time.time):
        self.db = db
        self.store_root = store_root
        self.drift_every_s = drift_every_s
        self.clock = clock
        self._drift: list[Any] = []
        self._drift_at = -1e18
        self._lock = threading.Lock()

    def render(self) -> str:
        from edgeml.fleet.prometheus_experiments import experiment_families

        with self._lock:
            fams = (self._devices() + self._models() + self._rollouts() + self._drift_families()
                    + experiment_families(self.db, self.clock()))      # per experiment and arm
        lines = [line for f in fams for line in f.render()]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ families
    def _devices(self) -> list[_Family]:
        rows = self.db.q("SELECT device_id, online, last_seen, active FROM devices ORDER BY device_id")
        total = _Family("edgeml_fleet_devices", "gauge", "Devices known to the manager, by state.")
        online = sum(1 for r in rows if r["online"])
        total.add(online, state="online")
        total.add(len(rows) - online, state="offline")
        per = _Family("edgeml_fleet_device_online", "gauge", "1 while the device is online (presence/heartbeat).")
        seen = _Family("edgeml_fleet_device_last_seen_timestamp_seconds", "gauge", "Last message from the device.")
        versions = _Family("edgeml_fleet_version_devices", "gauge", "Devices serving each model version.")
        count: dict[tuple[str, str], int] = {}
        for i, r in enumerate(rows):
            if i < MAX_SERIES_DEVICES:
                per.add(int(bool(r["online"])), device=r["device_id"])
                seen.add(float(r["last_seen"] or 0.0), device=r["device_id"])
            active = _json(r["active"])
            if isinstance(active, dict) and active.get("name"):
                key = (str(active["name"]), str(active.get("version")))
                count[key] = count.get(key, 0) + 1
        for (name, version), n in sorted(count.items()):
            versions.add(n, model=name, version=version)
        return [total, per, seen, versions]

    def _models(self) -> list[_Family]:
        from edgeml.fleet.metrics import merge, stored_buckets

        req = _Family("edgeml_fleet_model_requests_total", "counter", "Requests served, summed over devices.")
        fail = _Family("edgeml_fleet_model_failures_total", "counter", "Failed requests, summed over devices.")
        lat = _Family("edgeml_fleet_model_latency_ms", "histogram", "Request latency (ms), merged over devices.")
        by: dict[tuple[str, str], list[Any]] = {}
        for r in self.db.q("SELECT name, version, requests, failures, buckets, sum_ms FROM telemetry"):
            by.setdefault((r["name"], r["version"]), []).append(r)
        for (name, version), rows in sorted(by.items()):
            req.add(sum(int(r["requests"]) for r in rows), model=name, version=version)
            fail.add(sum(int(r["failures"]) for r in rows), model=name, version=version)
            buckets = merge(stored_buckets(r["buckets"]) for r in rows)
            for le, c in buckets.items():
                lat.add(c, "_bucket", model=name, version=version, le=le)
            lat.add(round(sum(float(r["sum_ms"]) for r in rows), 3), "_sum", model=name, version=version)
            lat.add(buckets.get("+Inf", 0), "_count", model=name, version=version)
        return [req, fail, lat]

    def _rollouts(self) -> list[_Family]:
        state = _Family("edgeml_fleet_rollout_state", "gauge", "1 for the rollout's current state.")
        active = _Family("edgeml_fleet_rollout_active", "gauge", "1 while the rollout runs, is paused or rolls back.")
        wave = _Family("edgeml_fleet_rollout_wave", "gauge", "Current wave (1-based).")
        progress = _Family("edgeml_fleet_rollout_last_progress_timestamp_seconds", "gauge",
                           "Last change of the rollout or of one of its devices.")
        gate_v = _Family("edgeml_fleet_gate_value", "gauge", "Last measured value of a rollout gate (NaN: no data).")
        gate_ok = _Family("edgeml_fleet_gate_ok", "gauge", "1 when the gate passed at its last evaluation.")
        last = {r["rollout_id"]: r["t"] for r in self.db.q(
            "SELECT rollout_id, MAX(updated_at) AS t FROM rollout_devices GROUP BY rollout_id")}
        for r in self.db.q("SELECT id, name, version, state, wave, updated_at, gate_results FROM rollouts"):
            lab = {"rollout": r["id"], "model": r["name"], "version": r["version"]}
            state.add(1, **lab, state=r["state"])
            active.add(int(r["state"] in ACTIVE_ROLLOUT_STATES), **lab)
            wave.add(int(r["wave"]) + 1, **lab)
            progress.add(max(float(r["updated_at"] or 0), float(last.get(r["id"]) or 0)), **lab)
            gates = _json(r["gate_results"])
            for g in gates if isinstance(gates, list) else []:
                if isinstance(g, dict) and isinstance(g.get("gate"), str):
                    value = g.get("value")
                    gate_v.add(float(value) if isinstance(value, (int, float)) else None, rollout=r["id"], gate=g["gate"])
                    gate_ok.add(int(bool(g.get("ok"))), rollout=r["id"], gate=g["gate"])
        return [state, active, wave, progress, gate_v, gate_ok]

    def _drift_families(self) -> list[_Family]:
        from edgeml.fleet.drift import analyze

        now = self.clock()
        if now - self._drift_at >= self.drift_every_s:
            try:
                self._drift = analyze(self.db, self.store_root, now=now)
            except Exception as exc:  # noqa: BLE001 - a scrape must answer even if drift cannot be computed
                log.warning("drift metrics: %s", exc)
                self._drift = []
            self._drift_at = now
        score = _Family("edgeml_fleet_drift_score", "gauge", "Largest per-column PSI vs the reference profile.")
        pval = _Family("edgeml_fleet_drift_p_value", "gauge", "Smallest Holm-adjusted chi-square p-value.")
        drifted = _Family("edgeml_fleet_drift_drifted", "gauge", "1 when drift is significant and PSI >= min_psi.")
        samples = _Family("edgeml_fleet_drift_samples", "gauge", "Live samples in the drift window.")
        for rep in self._drift:
            lab = {"model": rep.model, "version": rep.version}
            score.add(rep.score, **lab)
            pval.add(rep.p_value, **lab)
            drifted.add(int(rep.drifted), **lab)
            samples.add(rep.samples, **lab)
        return [score, pval, drifted, samples]


def _json(text: Any) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


class MetricsServer(BackgroundHTTPServer):
    """``GET /metrics`` in a background thread (ThreadingHTTPServer); anything else is 404."""

    def __init__(self, metrics: FleetMetrics, host: str = "127.0.0.1", port: int = 0):
        body_of = metrics.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self._send(404, b"not found: the manager serves /metrics only\n")
                    return
                try:
                    body = body_of().encode()
                except Exception as exc:  # noqa: BLE001 - one line to the scraper, never a traceback
                    self._send(500, f"metrics failed: {type(exc).__name__}: {exc}\n".encode())
                    return
                self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        super().__init__(Handler, host, port, "fleet-metrics")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


def families(text: str) -> Iterable[str]:
    """Metric names in an exposition text (tests)."""
    return sorted({line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")})
