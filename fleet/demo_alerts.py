"""Alerts in the fleet demos: a local Alertmanager-webhook receiver, and why a quiet alert is quiet.

The demos run the manager's own notifier (``Monitoring`` of fleet/monitor_cli.py, the code behind
``edgeml fleet manager --alert-webhook URL``) against ``WebhookReceiver``, a real HTTP server on
loopback that keeps and prints every Alertmanager JSON payload it receives. ``quiet_reasons`` says,
with the measured values, why an alert of fleet/alerts.py did not fire.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from edgeml.errors import FleetError

MAX_PAYLOAD_BYTES = 1 << 20        # one webhook POST; a bigger one is refused (413), never read whole


class WebhookReceiver:
    """``POST /hook`` on 127.0.0.1: every payload is kept (in order) and echoed as indented JSON."""

    def __init__(self, echo: Callable[[str], None] = print):
        received: list[dict[str, Any]] = []
        lock = threading.Lock()
        self._received, self._lock = received, lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("Content-Length") or 0)
                if not 0 < size <= MAX_PAYLOAD_BYTES:
                    self.send_response(413)
                    self.end_headers()
                    return
                try:
                    doc = json.loads(self.rfile.read(size))
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                with lock:
                    received.append(doc)
                echo("webhook receiver got (Alertmanager JSON):\n" + json.dumps(doc, indent=2))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="demo-webhook", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._received)

    def alerts(self, name: str, status: str = "firing") -> list[dict[str, Any]]:
        return [a for p in self.payloads() for a in p.get("alerts", [])
                if a.get("labels", {}).get("alertname") == name and a.get("status") == status]

    def wait_for(self, name: str, timeout: float, status: str = "firing") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.alerts(name, status):
                return found[-1]
            time.sleep(0.2)
        raise FleetError(f"demo: the manager's notifier posted no {status} {name} alert within {timeout:.0f}s")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def quiet_reasons(db: Any, fired: set[str], thresholds: Any = None) -> list[str]:
    """For the telemetry alerts that did not fire: the measured values against their thresholds."""
    from edgeml.fleet.alerts import Thresholds, _version_rows

    t = thresholds or Thresholds()
    rows = _version_rows(db)
    out = []
    if "EdgemlModelErrorRateHigh" not in fired:
        for (name, version), v in sorted(rows.items()):
            rate = v["failures"] / v["requests"] if v["requests"] else 0.0
            out.append(f"EdgemlModelErrorRateHigh quiet for {name}@{version}: {v['failures']}/{v['requests']}"
                       f" failed ({rate:.1%}); fires above {t.error_rate:.0%} with >= {t.min_requests} requests")
    if "EdgemlP95LatencyRegression" not in fired:
        p95 = {k: v["p95"] for k, v in rows.items() if v["requests"] >= t.min_requests and v["p95"]}
        text = ", ".join(f"{n}@{ver} p95 <= {p} ms" for (n, ver), p in sorted(p95.items())) or "no version has"
        out.append(f"EdgemlP95LatencyRegression quiet: {text} (>= {t.min_requests} requests); fires when one version's"
                   f" p95 exceeds {t.p95_ratio}x another version's of the same model. Experiment arms are served"
                   " beside the champion and reported per arm (experiment status, /metrics), not in the telemetry"
                   " these alerts read")
    if "EdgemlDeviceOffline" not in fired:
        online = db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0]
        total = db.one("SELECT COUNT(*) FROM devices")[0]
        out.append(f"EdgemlDeviceOffline quiet: {online}/{total} devices online; fires {t.offline_for_s:.0f} s after"
                   " a device goes offline")
    if "EdgemlRolloutStalled" not in fired:
        running = db.one("SELECT COUNT(*) FROM rollouts WHERE state IN ('running', 'rolling_back')")[0]
        out.append(f"EdgemlRolloutStalled quiet: {running} rollout(s) in progress; fires after {t.stall_s:.0f} s"
                   " without progress")
    if "EdgemlModelDrift" not in fired:
        out.append("EdgemlModelDrift quiet: no model version drifted in the last hour (`edgeml fleet drift` says why;"
                   " an artifact without a drift_profile, like the demo's tiny models, is never compared)")
    return out
