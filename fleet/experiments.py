"""Experiments on the fleet, manager side: records, messages to devices, per-arm totals, status and decision.

    edgeml fleet experiment start NAME --champion M@1 --challenger M@2 --mode shadow|ab|bandit ...
        -> an ``experiments`` row; every selected online device serving the champion gets a retained,
           signed message on ``edgeml/v1/devices/{id}/experiment`` (the challenger's artifact, verified and
           loaded beside the champion by the agent: fleet/arms.py)
    agents report cumulative per-arm counters in telemetry (``experiments`` rows) -> ``experiment_reports``
    (latest row per device: a lost message loses nothing, a repeated one counts once)
    status = sum over devices -> the statistics of fleet/experiment_stats.py -> promote | reject | continue
    promote = stop + a normal rollout of the challenger; stop = an empty experiment message to every device.

The A/B horizon (outcomes per arm) is fixed when the experiment starts, from --baseline and --mde
(binary rewards) or --sigma and --mde (continuous): see docs/monitoring.md, "Experiments".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from edgeml.errors import FleetError, UsageError
from edgeml.fleet import experiment_stats as S
from edgeml.fleet import protocol as P
from edgeml.fleet.metrics import merge, quantile

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.manager import Manager

log = logging.getLogger("edgeml.fleet.experiments")
MODES = ("shadow", "ab", "bandit")
ARM_FIELDS = {"version": str, "requests": int, "failures": int, "latency_buckets_ms": dict, "latency_sum_ms": (int, float),
              "feedback": int, "reward_sum": (int, float), "reward_sq": (int, float)}
SHADOW_FIELDS = {"mirrored": int, "dropped": int, "compared": int, "agree": int, "failures": int,
                 "err_sum": (int, float), "err_sq": (int, float), "latency_buckets_ms": dict,
                 "latency_sum_ms": (int, float)}
PRIORS_EVERY_S = 2.0          # bandits: how often the fleet's merged outcomes go back to the devices
_TABLES = (
    "CREATE TABLE IF NOT EXISTS experiments (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL,"
    " state TEXT NOT NULL, devices TEXT NOT NULL, created_by TEXT, created_at REAL, updated_at REAL,"
    " priors_at REAL)",
    "CREATE TABLE IF NOT EXISTS experiment_reports (experiment_id TEXT NOT NULL, device_id TEXT NOT NULL,"
    " ts REAL NOT NULL, report TEXT NOT NULL, PRIMARY KEY (experiment_id, device_id))",
)


def topic(device_id: str) -> str:
    """Manager -> agent, retained, QoS 1: the experiment this device takes part in (``experiment: null``: none)."""
    return f"{P.PREFIX}/devices/{device_id}/experiment"


@dataclass
class Spec:
    name: str
    model: str
    champion: str
    challenger: str
    mode: str
    selector: dict[str, str] = field(default_factory=dict)
    sample: float = 0.1
    split: float = 0.5
    split_by: str = "request"
    reward: str = "binary"
    duration_s: float | None = None
    alpha: float = 0.05
    power: float = 0.8
    baseline: float = 0.5
    mde: float = 0.05
    sigma: float = 1.0
    horizon: int = 0            # outcomes per arm, fixed at start


def ensure_tables(db: "FleetDB") -> None:
    for sql in _TABLES:
        db.x(sql)


def _tables_exist(db: "FleetDB") -> bool:
    try:
        db.q("SELECT id FROM experiments LIMIT 1")
        return True
    except Exception:  # noqa: BLE001 - an older database (or read-only and never written)
        return False


def _split_target(text: str, option: str) -> tuple[str, str]:
    model, at, version = (text or "").partition("@")
    if not at or not model or not version:
        raise UsageError(f"{option} {text!r} is not NAME@VERSION", hint=f"e.g. {option} digits@1.0.0")
    return model, version


def build_spec(args: Mapping[str, Any]) -> Spec:
    """The CLI's arguments -> a checked Spec with its fixed horizon (one clear error per bad option)."""
    model, champion = _split_target(args.get("champion", ""), "--champion")
    model2, challenger = _split_target(args.get("challenger", ""), "--challenger")
    if model != model2:
        raise UsageError(f"--champion is model {model!r} but --challenger is {model2!r}; compare versions of one model")
    if champion == challenger:
        raise UsageError("--champion and --challenger name the same version")
    mode = args.get("mode")
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    spec = Spec(name=str(args["name"]), model=model, champion=champion, challenger=challenger, mode=mode,
                selector=dict(args.get("selector") or {}), sample=float(args.get("sample", 0.1)),
                split=float(args.get("split", 0.5)), split_by=str(args.get("split_by", "request")),
                reward=str(args.get("reward", "binary")), duration_s=args.get("duration_s"),
                alpha=float(args.get("alpha", 0.05)), power=float(args.get("power", 0.8)),
                baseline=float(args.get("baseline", 0.5)), mde=float(args.get("mde", 0.05)),
                sigma=float(args.get("sigma", 1.0)))
    if not (0 < spec.sample <= 1) or not (0 < spec.split < 1):
        raise UsageError("--sample must be in (0%, 100%] and --split in (0%, 100%)")
    if spec.split_by not in ("request", "device") or spec.reward not in ("binary", "continuous"):
        raise UsageError("--split-by is request or device; --reward is binary or continuous")
    # sized at the level the decision reads (alpha/2: Bonferroni over the primary metric and the latency
    # guardrail), so the designed effect is promoted with the stated power under the rule actually used
    level = S.decision_level(spec.alpha)
    try:
        spec.horizon = (S.sample_size_proportions(spec.baseline, spec.mde, alpha=level, power=spec.power)
                        if spec.reward == "binary" else
                        S.sample_size_means(spec.sigma, spec.mde, alpha=level, power=spec.power))
    except ValueError as exc:
        raise UsageError(f"cannot size the experiment: {exc}", hint="--baseline in (0,1), --mde and --sigma > 0") from None
    return spec


# ---------------------------------------------------------------- manager commands
def execute(mgr: "Manager", command: str, args: dict[str, Any], actor: str) -> dict[str, Any]:
    ensure_tables(mgr.db)
    if command == "experiment.start":
        return start(mgr, build_spec(args), actor)
    ops = {"experiment.stop": stop, "experiment.promote": promote}
    if command not in ops:
        raise UsageError(f"unknown manager command {command!r}")
    return ops[command](mgr, str(args["id"]), actor)


def _artifact(mgr: "Manager", model: str, version: str) -> dict[str, Any]:
    row = mgr.db.one("SELECT sha256 FROM artifacts WHERE name = ? AND version = ?", (model, version))
    if row is None:
        raise FleetError(f"{model}@{version} is not published", hint="publish it first: edgeml fleet publish FILE")
    art = mgr._artifact_msg(row["sha256"])
    assert art is not None
    return art


def start(mgr: "Manager", spec: Spec, actor: str) -> dict[str, Any]:
    if mgr.db.one("SELECT id FROM experiments WHERE name = ? AND state = 'running'", (spec.name,)) is not None:
        raise FleetError(f"an experiment named {spec.name!r} is already running", hint="stop it or pick another name")
    challenger = _artifact(mgr, spec.model, spec.challenger)
    _artifact(mgr, spec.model, spec.champion)
    devices = []
    for d in mgr.db.q("SELECT device_id, labels, active FROM devices WHERE online = 1 ORDER BY device_id"):
        active = json.loads(d["active"]) if d["active"] else None
        if (P.selector_matches(spec.selector, json.loads(d["labels"] or "{}")) and active
                and active.get("name") == spec.model and active.get("version") == spec.champion):
            devices.append(d["device_id"])
    if not devices:
        raise FleetError(f"no online device matching {spec.selector or 'the whole fleet'} serves {spec.model}@"
                         f"{spec.champion}", hint="roll the champion out first (edgeml fleet rollout start)")
    eid = uuid.uuid4().hex[:12]
    now = mgr.clock()
    mgr.db.x("INSERT INTO experiments VALUES (?,?,?,?,?,?,?,?,?)",
             (eid, spec.name, json.dumps(asdict(spec)), "running", json.dumps(devices), actor, now, now, now))
    mgr.db.audit(now, actor, "experiment.start", eid, asdict(spec))
    for device_id in devices:
        _send(mgr, device_id, _device_doc(eid, spec, device_id, challenger, {}))
    return status(mgr.db, eid)


def _device_doc(eid: str, spec: Spec, device_id: str, challenger: dict[str, Any],
                priors: dict[str, list[float]]) -> dict[str, Any]:
    arm = None
    if spec.mode == "ab" and spec.split_by == "device":     # a stable share of the devices on the challenger
        h = int.from_bytes(hashlib.blake2b(f"{eid}/{device_id}".encode(), digest_size=8).digest(), "big") / 2.0 ** 64
        arm = spec.challenger if h < spec.split else spec.champion
    return {"id": eid, "model": spec.model, "champion": spec.champion, "challenger": challenger, "mode": spec.mode,
            "sample": spec.sample, "split": spec.split, "split_by": spec.split_by, "device_arm": arm,
            "reward": spec.reward, "priors": priors}


def _send(mgr: "Manager", device_id: str, experiment: dict[str, Any] | None) -> None:
    msg = {"schema_version": P.SCHEMA_VERSION, "type": "experiment", "device_id": device_id,
           "seq": mgr.db.next_seq(), "issued_at": mgr.clock(), "experiment": experiment}
    if mgr.config.sign_key:
        P.sign(msg, mgr.config.sign_key)
    mgr._publish(topic(device_id), P.encode(msg))


def _load(db: "FleetDB", eid: str) -> tuple[dict[str, Any], Spec]:
    row = db.one("SELECT * FROM experiments WHERE id = ? OR name = ? ORDER BY created_at DESC", (eid, eid)) \
        if _tables_exist(db) else None
    if row is None:
        raise FleetError(f"no experiment {eid!r}", hint="list them with: edgeml fleet experiment status")
    return dict(row), Spec(**json.loads(row["spec"]))


def stop(mgr: "Manager", eid: str, actor: str, state: str = "stopped") -> dict[str, Any]:
    row, _ = _load(mgr.db, eid)
    if row["state"] == "running":
        mgr.db.x("UPDATE experiments SET state = ?, updated_at = ? WHERE id = ?", (state, mgr.clock(), row["id"]))
        mgr.db.audit(mgr.clock(), actor, f"experiment.{state}", row["id"])
        for device_id in json.loads(row["devices"]):
            _send(mgr, device_id, None)
    return status(mgr.db, row["id"])


def promote(mgr: "Manager", eid: str, actor: str) -> dict[str, Any]:
    row, spec = _load(mgr.db, eid)
    stop(mgr, row["id"], actor, state="promoted")
    rollout = mgr.start_rollout(f"{spec.model}@{spec.challenger}", selector=spec.selector, waves=[0.25, 1.0],
                                max_failure_rate=0.1, bake_s=0.0, gates=[], actor=actor, health_window_s=None)
    return {**status(mgr.db, row["id"]), "rollout": rollout}


def tick(mgr: "Manager") -> None:
    """Duration over -> done (the devices stop); bandits: send the fleet's merged outcomes back."""
    if not _tables_exist(mgr.db):
        return
    now = mgr.clock()
    for row in mgr.db.q("SELECT * FROM experiments WHERE state = 'running'"):
        spec = Spec(**json.loads(row["spec"]))
        if spec.duration_s is not None and now - row["created_at"] >= spec.duration_s:
            stop(mgr, row["id"], "manager", state="done")
            continue
        if spec.mode == "bandit" and now - (row["priors_at"] or 0) >= PRIORS_EVERY_S:
            mgr.db.x("UPDATE experiments SET priors_at = ? WHERE id = ?", (now, row["id"]))
            reports = _reports(mgr.db, row["id"])
            challenger = _artifact(mgr, spec.model, spec.challenger)
            for device_id in json.loads(row["devices"]):
                others = [r for d, r in reports.items() if d != device_id]
                _send(mgr, device_id, _device_doc(row["id"], spec, device_id, challenger, _priors(others)))


def _priors(reports: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for rep in reports:
        for a in rep["arms"]:
            acc = out.setdefault(a["version"], [0, 0.0, 0.0])
            acc[0] += a["feedback"]
            acc[1] += a["reward_sum"]
            acc[2] += a["reward_sq"]
    return out


# ---------------------------------------------------------------- telemetry in
def wire_problem(row: Any) -> str | None:
    """Why a telemetry ``experiments`` row is malformed (None: fine). Exact fields, non-negative numbers."""
    if not isinstance(row, dict) or set(row) != {"experiment", "mode", "arms", "shadow"}:
        return "must be an object with exactly experiment, mode, arms, shadow"
    if not isinstance(row["experiment"], str) or len(row["experiment"]) > 64 or row["mode"] not in MODES:
        return "has a bad experiment id or mode"
    if not isinstance(row["arms"], list) or len(row["arms"]) != 2:
        return "must have exactly two arms"
    for arm in row["arms"]:
        problem = _fields_problem(arm, ARM_FIELDS)
        if problem:
            return f"arm {problem}"
    if row["shadow"] is not None:
        problem = _fields_problem(row["shadow"], SHADOW_FIELDS)
        if problem:
            return f"shadow {problem}"
    return None


def _fields_problem(obj: Any, fields: Mapping[str, Any]) -> str | None:
    if not isinstance(obj, dict) or set(obj) != set(fields):
        return f"must have exactly the fields {', '.join(fields)}"
    for name, want in fields.items():
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, want):
            return f"field {name} has type {type(v).__name__}"
        if isinstance(v, (int, float)) and (not math.isfinite(v) or v < 0 or v > P.MAX_INT):
            return f"field {name} is {v}; expected a finite number >= 0"
        if name == "latency_buckets_ms" and (set(v) - set(P.BUCKET_KEYS) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= P.MAX_INT for c in v.values())):
            return "latency_buckets_ms must use the fixed edges with integer counts"
        if name == "version" and len(v) > 128:
            return "version is too long"
    return None


def record(db: "FleetDB", msg: Mapping[str, Any]) -> None:
    """Keep each device's latest cumulative report per running experiment it takes part in."""
    if not _tables_exist(db):
        return
    for rep in msg.get("experiments") or []:
        row = db.one("SELECT devices FROM experiments WHERE id = ? AND state = 'running'", (rep["experiment"],))
        if row is None or msg["device_id"] not in json.loads(row["devices"]):
            continue        # stopped meanwhile, or a device that was never asked: ignored
        db.x("INSERT OR REPLACE INTO experiment_reports VALUES (?,?,?,?)",
             (rep["experiment"], msg["device_id"], msg["ts"], json.dumps(rep)))


def _reports(db: "FleetDB", eid: str) -> dict[str, dict[str, Any]]:
    return {r["device_id"]: json.loads(r["report"])
            for r in db.q("SELECT device_id, report FROM experiment_reports WHERE experiment_id = ?", (eid,))}


# ---------------------------------------------------------------- status
def _totals(reports: list[dict[str, Any]], version: str) -> dict[str, Any]:
    arms = [a for rep in reports for a in rep["arms"] if a["version"] == version]
    hist = merge(a["latency_buckets_ms"] for a in arms)
    return {"version": version, "requests": sum(a["requests"] for a in arms),
            "failures": sum(a["failures"] for a in arms), "feedback": sum(a["feedback"] for a in arms),
            "reward_sum": sum(a["reward_sum"] for a in arms), "reward_sq": sum(a["reward_sq"] for a in arms),
            "latency_buckets_ms": hist, "p50_ms": quantile(hist, 0.5), "p95_ms": quantile(hist, 0.95)}


def _arm_view(t: dict[str, Any], alpha: float, binary: bool) -> dict[str, Any]:
    n = t["feedback"]
    if binary:
        rate, lo, hi = S.wilson(int(round(t["reward_sum"])), n, alpha=alpha)
    else:
        rate, lo, hi = S.mean_ci(n, t["reward_sum"], t["reward_sq"], alpha=alpha)
    return {k: v for k, v in t.items() if k != "latency_buckets_ms"} | {
        "outcome": round(rate, 6), "outcome_ci": [round(lo, 6), round(hi, 6)]}


def status(db: "FleetDB", eid: str) -> dict[str, Any]:
    row, spec = _load(db, eid)
    reports = list(_reports(db, row["id"]).values())
    champ, chall = _totals(reports, spec.champion), _totals(reports, spec.challenger)
    binary = spec.reward == "binary"
    out: dict[str, Any] = {"id": row["id"], "name": spec.name, "mode": spec.mode, "state": row["state"],
                           "model": spec.model, "devices": len(json.loads(row["devices"])), "reporting": len(reports),
                           "arms": [_arm_view(champ, spec.alpha, binary) | {"role": "champion"},
                                    _arm_view(chall, spec.alpha, binary) | {"role": "challenger"}]}
    latency = S.latency_mann_whitney(champ["latency_buckets_ms"], chall["latency_buckets_ms"], alpha=spec.alpha) \
        if champ["requests"] and chall["requests"] else None
    if spec.mode == "shadow":
        out["shadow"] = _shadow_view(reports, spec.alpha)
        out["decision"] = {"decision": "continue" if row["state"] == "running" else row["state"],
                           "reason": "shadow experiments measure agreement; promote by hand when it is good enough"}
        return out
    if binary:
        primary = S.two_proportions(int(round(champ["reward_sum"])), champ["feedback"],
                                    int(round(chall["reward_sum"])), chall["feedback"], alpha=spec.alpha)
    else:
        primary = S.welch_means(champ["feedback"], champ["reward_sum"], champ["reward_sq"],
                                chall["feedback"], chall["reward_sum"], chall["reward_sq"], alpha=spec.alpha)
    out["test"] = primary.to_dict()
    out["latency_test"] = latency.to_dict() if latency is not None else None
    if spec.mode == "ab":
        d = S.decide(primary, latency, spec.horizon, alpha=spec.alpha)
        out["decision"] = {"decision": d.decision, "reason": d.reason, "samples_needed_per_arm": d.samples_needed,
                           "horizon_per_arm": d.horizon_per_arm, "method": "fixed horizon, one look; Bonferroni"
                           " alpha/2 for the primary metric and the latency guardrail"}
    else:
        out["bandit"] = _bandit_view(champ, chall, binary)
        out["decision"] = {"decision": "continue" if row["state"] == "running" else row["state"],
                           "reason": "bandits keep routing; promote the arm it converged to by hand"}
    return out


def _shadow_view(reports: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
    rows = [rep["shadow"] for rep in reports if rep.get("shadow")]
    tot = {k: sum(r[k] for r in rows) for k in ("mirrored", "dropped", "compared", "agree", "failures", "err_sum", "err_sq")}
    rate, lo, hi = S.wilson(tot["agree"], tot["compared"], alpha=alpha)
    err, elo, ehi = S.mean_ci(tot["compared"], tot["err_sum"], tot["err_sq"], alpha=alpha)
    hist = merge(r["latency_buckets_ms"] for r in rows)
    return {**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in tot.items()},
            "agreement": round(rate, 6), "agreement_ci": [round(lo, 6), round(hi, 6)],
            "mean_abs_error": round(err, 6), "mean_abs_error_ci": [_r(elo), _r(ehi)],
            "challenger_p50_ms": quantile(hist, 0.5), "challenger_p95_ms": quantile(hist, 0.95)}


def _r(v: float) -> float | None:
    return round(v, 6) if math.isfinite(v) else None


def _bandit_view(champ: dict[str, Any], chall: dict[str, Any], binary: bool) -> dict[str, Any]:
    arms = (champ, chall)
    means = [a["reward_sum"] / a["feedback"] if a["feedback"] else 0.0 for a in arms]
    n = [a["feedback"] for a in arms]
    best = max(means)
    regret = sum(k * (best - m) for k, m in zip(n, means))
    uniform = sum(n) / 2 * (best - min(means))
    view: dict[str, Any] = {"share": [round(k / max(sum(n), 1), 4) for k in n], "mean_reward": [round(m, 6) for m in means],
                            "regret": round(regret, 4), "regret_if_uniform": round(uniform, 4)}
    if binary:
        view["prob_best"] = S.prob_best([(1 + a["reward_sum"], 1 + a["feedback"] - a["reward_sum"]) for a in arms])
    return view


def list_experiments(db: "FleetDB") -> list[dict[str, Any]]:
    if not _tables_exist(db):
        return []
    return [status(db, r["id"]) for r in db.q("SELECT id FROM experiments ORDER BY created_at")]
