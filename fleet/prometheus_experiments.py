"""Experiment arms on the manager's ``/metrics`` (fleet/prometheus.py renders them after the fleet series).

Per experiment and arm, from the same totals and tests as ``edgeml fleet experiment status``
(fleet/experiments.py): requests, failures, feedback outcomes, the outcome (rate for binary
rewards, mean reward otherwise) with its confidence interval, the arm's p50/p95 latency (bucket
upper bounds, seconds); per experiment: state, decision, the primary and latency-guardrail p-values, the
outcomes per arm still needed to reach the fixed horizon; shadow agreement. Labels:
``experiment`` (id), ``name``, ``model``, ``mode`` (on the state series), ``arm`` (the version) and
``role`` (champion | challenger). Running experiments and those that ended within the last
``RECENT_S`` are exported, at most ``MAX_EXPERIMENTS`` of them (newest first), so the series
count stays bounded however many experiments the database remembers.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeml.fleet.prometheus import _Family

log = logging.getLogger("edgeml.fleet.prometheus")
MAX_EXPERIMENTS = 50
RECENT_S = 86400.0
DECISIONS = ("continue", "promote", "reject", "stopped", "promoted")


class _Fams:
    def __init__(self) -> None:
        f = _Family
        self.state = f("edgeml_fleet_experiment_state", "gauge", "1 for the experiment's state (running, stopped, promoted).")
        self.decision = f("edgeml_fleet_experiment_decision", "gauge",
                          "1 for the experiment's current decision (continue, promote, reject; shadow/bandit: state).")
        self.p_value = f("edgeml_fleet_experiment_p_value", "gauge",
                         "p-value of the experiment's test: primary (outcome) or latency (Mann-Whitney guardrail).")
        self.needed = f("edgeml_fleet_experiment_samples_needed", "gauge", "A/B outcomes per arm still to collect.")
        self.requests = f("edgeml_fleet_experiment_arm_requests_total", "counter", "Requests answered by the arm.")
        self.failures = f("edgeml_fleet_experiment_arm_failures_total", "counter", "Failed requests of the arm.")
        self.feedback = f("edgeml_fleet_experiment_arm_feedback_total", "counter", "Outcomes (feedback) reported.")
        self.outcome = f("edgeml_fleet_experiment_arm_outcome", "gauge",
                         "Outcome rate (binary rewards) or mean reward of the arm; bound=low|high: its CI.")
        self.p50 = f("edgeml_fleet_experiment_arm_p50_latency_seconds", "gauge",
                     "Median latency of the arm: upper bound of the bucket holding it (never optimistic).")
        self.p95 = f("edgeml_fleet_experiment_arm_p95_latency_seconds", "gauge",
                     "95th percentile latency of the arm: upper bound of the bucket holding it.")
        self.agreement = f("edgeml_fleet_experiment_shadow_agreement", "gauge",
                           "Shadow: share of mirrored requests where the challenger agreed with the champion.")
        self.compared = f("edgeml_fleet_experiment_shadow_compared_total", "counter", "Shadow: requests compared.")
        self.dropped = f("edgeml_fleet_experiment_shadow_dropped_total", "counter",
                         "Shadow: mirrored requests dropped because the challenger was busy.")

    def all(self) -> list[_Family]:
        return [self.state, self.decision, self.p_value, self.needed, self.requests, self.failures, self.feedback,
                self.outcome, self.p50, self.p95, self.agreement, self.compared, self.dropped]


def experiment_families(db: Any, now: float) -> list[_Family]:
    from edgeml.fleet.experiments import _tables_exist, status

    fams = _Fams()
    if not _tables_exist(db):
        return fams.all()
    rows = db.q("SELECT id FROM experiments WHERE state = 'running' OR updated_at >= ? ORDER BY created_at DESC"
                " LIMIT ?", (now - RECENT_S, MAX_EXPERIMENTS))
    for r in rows:
        try:
            _add(fams, status(db, r["id"]))
        except Exception as exc:  # noqa: BLE001 - one bad record must not take the whole scrape down
            log.warning("experiment %s metrics: %s", r["id"], exc)
    return fams.all()


def _add(f: _Fams, s: dict[str, Any]) -> None:
    exp = {"experiment": s["id"], "name": s["name"], "model": s["model"]}
    f.state.add(1, **exp, mode=s["mode"], state=s["state"])
    f.decision.add(1, **exp, decision=s["decision"]["decision"])
    if s.get("test"):
        f.p_value.add(s["test"]["p_value"], **exp, test="primary")
    if s.get("latency_test"):
        f.p_value.add(s["latency_test"]["p_value"], **exp, test="latency")
    if s["mode"] == "ab":
        f.needed.add(s["decision"].get("samples_needed_per_arm"), **exp)
    for arm in s["arms"]:
        lab = {**exp, "arm": arm["version"], "role": arm["role"]}
        f.requests.add(arm["requests"], **lab)
        f.failures.add(arm["failures"], **lab)
        f.feedback.add(arm["feedback"], **lab)
        f.outcome.add(arm["outcome"] if arm["feedback"] else None, **lab)
        if arm["feedback"]:
            f.outcome.add(arm["outcome_ci"][0], **lab, bound="low")
            f.outcome.add(arm["outcome_ci"][1], **lab, bound="high")
        f.p50.add(_seconds(arm["p50_ms"]), **lab)
        f.p95.add(_seconds(arm["p95_ms"]), **lab)
    if sh := s.get("shadow"):
        f.agreement.add(sh["agreement"] if sh["compared"] else None, **exp)
        f.compared.add(sh["compared"], **exp)
        f.dropped.add(sh["dropped"], **exp)


def _seconds(ms: Any) -> float | None:
    """A quantile from metrics.quantile (a bucket's upper bound in ms, inf past the last edge, None: no data)."""
    if ms is None:
        return None
    try:
        return float(ms) / 1000.0
    except (TypeError, ValueError):
        return None
