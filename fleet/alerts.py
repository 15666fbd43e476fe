"""The manager's own alerts, posted to a webhook as Alertmanager would (for sites without Prometheus).

``evaluate(db, ...)`` checks the same conditions as deploy/prometheus/alerts.yml, from the
manager's database: a device offline, a model version's error rate, a p95 latency regression
of one version against the other versions of the model, drift (fleet/drift.py), a stalled
rollout, an experiment arm's error rate. ``Notifier`` runs it every ``interval_s`` and POSTs the Alertmanager webhook payload
(``version: "4"``, ``status``, ``alerts[]`` with ``labels``, ``annotations``, ``startsAt``,
``endsAt``, ``fingerprint``) when an alert starts firing and when it resolves, so any receiver
written for Alertmanager (Slack/PagerDuty bridges, custom hooks) works unchanged. Delivery:
3 tries, 5 s timeout each, then the alert is retried at the next round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from edgeml.errors import UsageError

log = logging.getLogger("edgeml.fleet.alerts")
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass
class Thresholds:
    offline_for_s: float = 300.0
    error_rate: float = 0.05
    min_requests: int = 100
    p95_ratio: float = 1.5
    p95_min_increase_ms: float = 5.0     # and at least this much slower: sub-ms models jitter by a whole bucket
    stall_s: float = 1800.0


@dataclass
class Alert:
    name: str
    labels: dict[str, str]
    summary: str
    severity: str = "warning"
    starts_at: float = 0.0
    ends_at: float | None = None

    @property
    def key(self) -> str:
        raw = json.dumps({"alertname": self.name, **self.labels}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_dict(self, external_url: str) -> dict[str, Any]:
        return {"status": "resolved" if self.ends_at is not None else "firing",
                "labels": {"alertname": self.name, "severity": self.severity, **self.labels},
                "annotations": {"summary": self.summary},
                "startsAt": _rfc3339(self.starts_at),
                "endsAt": _rfc3339(self.ends_at) if self.ends_at is not None else ZERO_TIME,
                "generatorURL": external_url, "fingerprint": self.key}


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ----------------------------------------------------------------------------- conditions
def evaluate(db: Any, store_root: Path | None, now: float, t: Thresholds | None = None) -> list[Alert]:
    t = t or Thresholds()
    return (_offline(db, now, t) + _error_rates(db, t) + _p95_regressions(db, t) + _drift(db, store_root, now)
            + _stalled(db, now, t) + _experiment_arm_errors(db, t))


def _offline(db: Any, now: float, t: Thresholds) -> list[Alert]:
    return [Alert("EdgemlDeviceOffline", {"device": r["device_id"]},
                  f"device {r['device_id']} offline for {now - float(r['last_seen'] or 0):.0f} s")
            for r in db.q("SELECT device_id, last_seen FROM devices WHERE online = 0")
            if now - float(r["last_seen"] or 0) >= t.offline_for_s]


def _version_rows(db: Any) -> dict[tuple[str, str], dict[str, Any]]:
    from edgeml.fleet.metrics import merge, quantile, stored_buckets

    by: dict[tuple[str, str], list[Any]] = {}
    for r in db.q("SELECT name, version, requests, failures, buckets FROM telemetry"):
        by.setdefault((r["name"], r["version"]), []).append(r)
    out = {}
    for key, rows in by.items():
        buckets = merge(stored_buckets(r["buckets"]) for r in rows)
        out[key] = {"requests": sum(int(r["requests"]) for r in rows), "failures": sum(int(r["failures"]) for r in rows),
                    "p95": quantile(buckets, 0.95)}
    return out


def _error_rates(db: Any, t: Thresholds) -> list[Alert]:
    out = []
    for (name, version), v in sorted(_version_rows(db).items()):
        if v["requests"] >= t.min_requests and v["failures"] / v["requests"] > t.error_rate:
            out.append(Alert("EdgemlModelErrorRateHigh", {"model": name, "version": version},
                             f"{name}@{version}: {v['failures']}/{v['requests']} requests failed"
                             f" (> {t.error_rate:.0%})", "critical"))
    return out


def _p95_regressions(db: Any, t: Thresholds) -> list[Alert]:
    rows = {k: v for k, v in _version_rows(db).items() if v["requests"] >= t.min_requests and v["p95"]}
    out = []
    for (name, version), v in sorted(rows.items()):
        others = [o["p95"] for (n, ver), o in rows.items() if n == name and ver != version]
        if others and v["p95"] > t.p95_ratio * min(others) and v["p95"] - min(others) >= t.p95_min_increase_ms:
            out.append(Alert("EdgemlP95LatencyRegression", {"model": name, "version": version},
                             f"{name}@{version}: p95 <= {v['p95']} ms vs {min(others)} ms for another version"))
    return out


def _drift(db: Any, store_root: Path | None, now: float) -> list[Alert]:
    from edgeml.fleet.drift import analyze

    return [Alert("EdgemlModelDrift", {"model": r.model, "version": r.version},
                  f"{r.model}@{r.version}: drift score {r.score:.3f} (PSI), Holm p={r.p_value:.3g}, "
                  f"top {', '.join(c.name for c in r.top[:3])}")
            for r in analyze(db, store_root, now=now) if r.drifted and r.score is not None and r.p_value is not None]


def _stalled(db: Any, now: float, t: Thresholds) -> list[Alert]:
    last = {r["rollout_id"]: float(r["t"] or 0) for r in db.q(
        "SELECT rollout_id, MAX(updated_at) AS t FROM rollout_devices GROUP BY rollout_id")}
    out = []
    for r in db.q("SELECT id, name, version, updated_at FROM rollouts WHERE state IN ('running', 'rolling_back')"):
        idle = now - max(float(r["updated_at"] or 0), last.get(r["id"], 0.0))
        if idle >= t.stall_s:
            out.append(Alert("EdgemlRolloutStalled", {"rollout": r["id"], "model": r["name"], "version": r["version"]},
                             f"rollout {r['id']} ({r['name']}@{r['version']}) has not progressed for {idle:.0f} s"))
    return out


def _experiment_arm_errors(db: Any, t: Thresholds) -> list[Alert]:
    """An arm of a running experiment failing too often (the challenger is served beside the champion and
    reported per arm, so the model version error rate above does not see it)."""
    from edgeml.fleet.experiments import _tables_exist, status

    if not _tables_exist(db):
        return []
    out = []
    for r in db.q("SELECT id FROM experiments WHERE state = 'running' ORDER BY created_at"):
        s = status(db, r["id"])
        for arm in s["arms"]:
            if arm["requests"] >= t.min_requests and arm["failures"] / arm["requests"] > t.error_rate:
                out.append(Alert("EdgemlExperimentArmErrorRate",
                                 {"experiment": s["id"], "name": s["name"], "model": s["model"], "arm": arm["version"],
                                  "role": arm["role"]},
                                 f"experiment {s['name']}: {arm['role']} {s['model']}@{arm['version']} failed"
                                 f" {arm['failures']}/{arm['requests']} requests (> {t.error_rate:.0%})", "critical"))
    return out


# ----------------------------------------------------------------------------- delivery
def check_webhook_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url) > 2048:
        raise UsageError(f"--alert-webhook {url[:80]!r} must be an http(s) URL",
                         hint="e.g. --alert-webhook http://127.0.0.1:9093/hook")
    return url


def post(url: str, payload: dict[str, Any], *, tries: int = 3, timeout: float = 5.0) -> bool:
    data = json.dumps(payload).encode()
    for i in range(tries):
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if 200 <= resp.status < 300:
                    return True
        except (urllib.error.URLError, OSError) as exc:
            log.warning("alert webhook %s: %s (try %d/%d)", url, getattr(exc, "reason", exc), i + 1, tries)
        time.sleep(min(0.2 * 2 ** i, 2.0))
    return False


@dataclass
class Notifier:
    """Evaluate, diff against what is firing, post starts and resolutions (Alertmanager webhook JSON)."""

    db: Any
    store_root: Path | None
    url: str
    interval_s: float = 30.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    external_url: str = ""
    clock: Callable[[], float] = time.time
    sender: Callable[[str, dict[str, Any]], bool] = post
    firing: dict[str, Alert] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_webhook_url(self.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> dict[str, Any] | None:
        """One evaluation; returns the payload sent (None when nothing changed or delivery failed)."""
        now = self.clock()
        current = {a.key: a for a in evaluate(self.db, self.store_root, now, self.thresholds)}
        started = [a for k, a in current.items() if k not in self.firing]
        for a in started:
            a.starts_at = now
        resolved = [a for k, a in self.firing.items() if k not in current]
        for a in resolved:
            a.ends_at = now
        if not started and not resolved:
            return None
        alerts = [a.to_dict(self.external_url) for a in started + resolved]
        payload = {"version": "4", "groupKey": "{}:{edgeml=\"fleet\"}", "truncatedAlerts": 0,
                   "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
                   "receiver": "edgeml-manager", "groupLabels": {"edgeml": "fleet"},
                   "commonLabels": {"edgeml": "fleet"}, "commonAnnotations": {}, "externalURL": self.external_url,
                   "alerts": alerts}
        if not self.sender(self.url, payload):
            return None      # nothing recorded: the same changes are sent again next round
        for a in started:
            self.firing[a.key] = a
        for a in resolved:
            self.firing.pop(a.key, None)
        return payload

    def start(self) -> "Notifier":
        self._thread = threading.Thread(target=self._loop, name="fleet-alerts", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the loop must survive one bad round
                log.exception("alert round failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
