"""Drift on the manager: store the devices' sketch windows, compare them with the reference profile.

Per (model, version) - and, on demand, per device or per cohort (devices sharing a label
value) - the windows received in a time range are added bin by bin (sketches are counts, so
merging is exact) and compared, column by column, with the reference counts the compiler put
in the artifact's ``drift_profile``:

* **PSI** (population stability index) per column, ``sum (p - q) ln(p / q)`` over the bins,
  proportions floored at ``PSI_FLOOR`` so an empty bin does not make it infinite. The drift
  score of a model version is its largest column PSI. Rule of thumb: < 0.1 stable, 0.1-0.2
  moderate, > 0.2 shifted.
* a **chi-square test of homogeneity** per column on the 2 x bins table (reference vs live),
  ``scipy.stats.chi2_contingency`` without continuity correction, after merging adjacent
  bins (categories: the smallest ones) until every expected cell count is >= 5 (Cochran's
  rule, so the chi-square approximation holds).
* **Holm's step-down correction** over all columns of a version (inputs and prediction):
  it controls the family-wise error rate under any dependence between the columns (features
  are correlated), so "drifted" raised on in-distribution data happens in at most ``alpha``
  of the comparisons. The reported p-value is the smallest Holm-adjusted one.

``drifted`` = Holm-adjusted p < ``alpha`` AND score >= ``min_psi`` (statistically significant
and large enough to matter: with millions of samples a negligible shift is significant), and
only with at least ``min_samples`` live samples. docs/monitoring.md states the assumptions.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from edgeml.runtime import drift as D

PSI_FLOOR = 1e-4
MIN_EXPECTED = 5.0
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_PSI = 0.1
DEFAULT_MIN_SAMPLES = 50
DEFAULT_WINDOW_S = 3600.0
RETENTION_S = 7 * 86400.0          # windows older than this are deleted as new ones arrive
TOP_FEATURES = 5

_DDL = [
    "CREATE TABLE IF NOT EXISTS drift_windows (device_id TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,"
    " ts REAL NOT NULL, n INTEGER NOT NULL, dropped INTEGER NOT NULL, rate REAL NOT NULL, counts TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS drift_windows_by_model ON drift_windows(name, version, ts)",
]


# ----------------------------------------------------------------------------- storage
def ensure_table(conn: sqlite3.Connection) -> None:
    """The table lives beside the manager's versioned schema (fleet/db.py) and is created on first use:
    idempotent, and an older database simply gains it."""
    for stmt in _DDL:
        conn.execute(stmt)


def record(db: Any, msg: Mapping[str, Any], now: float | None = None) -> int:
    """Store a validated telemetry message's ``drift`` rows (manager clock, not the device's); prune old ones."""
    rows = msg.get("drift") or []
    if not rows:
        return 0
    now = time.time() if now is None else now
    with db.tx() as tx:
        ensure_table(tx.conn)
        for r in rows:
            tx.conn.execute("INSERT INTO drift_windows VALUES (?,?,?,?,?,?,?,?)",
                            (msg["device_id"], r["name"], r["version"], now, r["n"], r["dropped"], r["rate"],
                             json.dumps(r["counts"], separators=(",", ":"))))
            tx.conn.execute("DELETE FROM drift_windows WHERE name = ? AND version = ? AND ts < ?",
                            (r["name"], r["version"], now - RETENTION_S))
    return len(rows)


@dataclass
class Window:
    device_id: str
    name: str
    version: str
    ts: float
    n: int
    dropped: int
    counts: list[list[int]]


def windows(db: Any, *, model: str | None = None, version: str | None = None, since: float | None = None,
            devices: Iterable[str] | None = None) -> list[Window]:
    sql, args = "SELECT * FROM drift_windows WHERE 1 = 1", list[object]()
    for col, val in (("name", model), ("version", version)):
        if val is not None:
            sql += f" AND {col} = ?"
            args.append(val)
    if since is not None:
        sql += " AND ts >= ?"
        args.append(since)
    try:
        rows = db.q(sql + " ORDER BY ts", tuple(args))
    except Exception as exc:       # no drift_windows table yet (SQLite or PostgreSQL): nothing received
        if "drift_windows" not in str(exc):
            raise
        return []
    keep = set(devices) if devices is not None else None
    out = []
    for r in rows:
        if keep is not None and r["device_id"] not in keep:
            continue
        try:
            counts = json.loads(r["counts"])
        except ValueError:
            continue
        out.append(Window(r["device_id"], r["name"], r["version"], r["ts"], r["n"], r["dropped"], counts))
    return out


# ----------------------------------------------------------------------------- statistics
def psi(ref: np.ndarray, live: np.ndarray) -> float:
    p = np.maximum(ref / max(ref.sum(), 1), PSI_FLOOR)
    q = np.maximum(live / max(live.sum(), 1), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def merge_sparse_bins(ref: np.ndarray, live: np.ndarray, ordered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge bins until every expected count (both rows) is >= MIN_EXPECTED: neighbours for ordered
    (numeric) bins, the smallest with the next smallest for categories. Empty bins are dropped."""
    keep = (ref + live) > 0
    ref, live = ref[keep].astype(np.float64), live[keep].astype(np.float64)
    share = min(ref.sum(), live.sum()) / max(ref.sum() + live.sum(), 1)
    groups = [[i] for i in range(len(ref))]
    tot = list(ref + live)
    while len(tot) > 2 and min(tot) * share < MIN_EXPECTED:
        i = int(np.argmin(tot))
        if ordered:
            j = i + 1 if i == 0 or (i + 1 < len(tot) and tot[i + 1] <= tot[i - 1]) else i - 1
        else:
            j = int(np.argsort(tot)[1])
        a, b = min(i, j), max(i, j)
        groups[a] += groups.pop(b)
        tot[a] += tot.pop(b)
    return (np.array([ref[g].sum() for g in groups]), np.array([live[g].sum() for g in groups]))


def chi2_pvalue(ref: np.ndarray, live: np.ndarray, ordered: bool) -> float:
    from scipy.stats import chi2_contingency

    r, lv = merge_sparse_bins(ref, live, ordered)
    if len(r) < 2 or r.sum() == 0 or lv.sum() == 0:
        return 1.0
    res = chi2_contingency(np.vstack([r, lv]), correction=False)
    p = float(res.pvalue)
    return p if math.isfinite(p) else 1.0


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control under any dependence)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class ColumnDrift:
    name: str
    group: str
    psi: float
    p_value: float            # chi-square, before correction
    p_adjusted: float         # Holm


@dataclass
class DriftReport:
    model: str
    version: str
    group: str                # "all" | "device=<id>" | "<label>=<value>"
    windows: int
    samples: int
    devices: int
    dropped: int
    score: float | None       # max column PSI
    p_value: float | None     # min Holm-adjusted p
    drifted: bool
    top: list[ColumnDrift] = field(default_factory=list)
    reason: str | None = None
    prediction_psi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = f"{self.model}@{self.version}"
        for k in ("score", "p_value", "prediction_psi"):
            if d[k] is not None:
                d[k] = float(f"{d[k]:.6g}")
        d["top"] = [{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in c.items()} for c in d["top"]]
        return d


@dataclass
class Settings:
    alpha: float = DEFAULT_ALPHA
    min_psi: float = DEFAULT_MIN_PSI
    min_samples: int = DEFAULT_MIN_SAMPLES


def compare(profile: D.Profile, live: list[np.ndarray], n: int, settings: Settings) -> tuple[list[ColumnDrift], bool]:
    cols: list[ColumnDrift] = []
    for col, counts in zip(profile.columns, live):
        ref = np.asarray(col.counts, dtype=np.float64)
        lv = np.asarray(counts, dtype=np.float64)
        if lv.sum() == 0 or ref.sum() == 0:
            continue
        cols.append(ColumnDrift(col.name, col.group, psi(ref, lv), chi2_pvalue(ref, lv, col.kind == "numeric"), 1.0))
    for c, adj in zip(cols, holm([c.p_value for c in cols])):
        c.p_adjusted = adj
    score = max((c.psi for c in cols), default=0.0)
    p_min = min((c.p_adjusted for c in cols), default=1.0)
    return cols, verdict(n, score, p_min, settings)


def verdict(samples: int, score: float, p_value: float, settings: Settings, *, inclusive: bool = False) -> bool:
    """The ``drifted`` decision, shared by ``edgeml fleet drift`` and the ``drift_psi`` rollout gate: at least
    ``min_samples`` live samples AND Holm-adjusted p < ``alpha`` AND largest column PSI >= ``min_psi``
    (``> min_psi`` with ``inclusive``: the gate written ``drift_psi<=X`` allows a PSI of exactly X)."""
    large = score > settings.min_psi if inclusive else score >= settings.min_psi
    return samples >= settings.min_samples and p_value < settings.alpha and large


def report(profile: D.Profile | None, model: str, version: str, group: str, wins: list[Window],
           settings: Settings) -> DriftReport:
    n = sum(w.n for w in wins)
    rep = DriftReport(model, version, group, windows=len(wins), samples=n, devices=len({w.device_id for w in wins}),
                      dropped=sum(w.dropped for w in wins), score=None, p_value=None, drifted=False)
    if profile is None:
        rep.reason = "no per-feature drift profile in this artifact (compiled by an older edgeml)"
        return rep
    merged = [np.zeros(c.bins, dtype=np.int64) for c in profile.columns]
    used = 0
    for w in wins:
        if len(w.counts) != len(merged) or any(len(c) != m.size for c, m in zip(w.counts, merged)):
            continue    # a sketch on other bins (should not happen: name@version names one artifact)
        for m, c in zip(merged, w.counts):
            m += np.asarray(c, dtype=np.int64)
        used += 1
    if n < settings.min_samples:
        rep.reason = f"{n} samples; at least {settings.min_samples} are needed for a decision"
        return rep
    cols, rep.drifted = compare(profile, merged, n, settings)
    rep.top = sorted(cols, key=lambda c: (-c.psi, c.p_adjusted))[:TOP_FEATURES]
    rep.score = max((c.psi for c in cols), default=0.0)
    rep.p_value = min((c.p_adjusted for c in cols), default=1.0)
    pred = [c.psi for c in cols if c.group == "prediction"]
    rep.prediction_psi = max(pred) if pred else None
    if used != len(wins):
        rep.reason = f"{len(wins) - used} window(s) on other bins ignored"
    return rep


# ----------------------------------------------------------------------------- the manager's view
def profile_of(db: Any, store_root: Path | None, name: str, version: str) -> D.Profile | None:
    """The reference profile of a published name@version (read from the artifact in the manager's store)."""
    from edgeml.errors import EdgemlError
    from edgeml.runtime.artifact import read_manifest

    row = db.one("SELECT sha256 FROM artifacts WHERE name = ? AND version = ?", (name, version))
    if row is None or store_root is None:
        return None
    path = Path(store_root) / "sha256" / f"{row['sha256']}.edgepkg"
    try:
        return D.parse_profile(read_manifest(path).get("drift_profile"))
    except (EdgemlError, OSError, D.ProfileError):
        return None


def analyze(db: Any, store_root: Path | None, *, model: str | None = None, window_s: float = DEFAULT_WINDOW_S,
            by: str = "version", settings: Settings | None = None, now: float | None = None,
            devices: Iterable[str] | None = None, version: str | None = None) -> list[DriftReport]:
    """One report per model@version (``by="version"``), per device (``"device"``) or per cohort
    (``"label:KEY"``: devices grouped by the value of label KEY)."""
    settings = settings or Settings()
    now = time.time() if now is None else now
    wins = windows(db, model=model, version=version, since=now - window_s, devices=devices)
    groups: dict[tuple[str, str, str], list[Window]] = {}
    labels = _device_labels(db) if by.startswith("label:") else {}
    for w in wins:
        if by == "device":
            g = f"device={w.device_id}"
        elif by.startswith("label:"):
            key = by.split(":", 1)[1]
            g = f"{key}={labels.get(w.device_id, {}).get(key, '-')}"
        else:
            g = "all"
        groups.setdefault((w.name, w.version, g), []).append(w)
    profiles: dict[tuple[str, str], D.Profile | None] = {}
    out = []
    for (name, ver, g), ws in sorted(groups.items()):
        if (name, ver) not in profiles:
            profiles[(name, ver)] = profile_of(db, store_root, name, ver)
        out.append(report(profiles[(name, ver)], name, ver, g, ws, settings))
    return out


def _device_labels(db: Any) -> dict[str, dict[str, str]]:
    out = {}
    for r in db.q("SELECT device_id, labels FROM devices"):
        try:
            out[r["device_id"]] = json.loads(r["labels"] or "{}")
        except ValueError:
            out[r["device_id"]] = {}
    return out


class GateMeasure(tuple[Optional[float], str]):
    """What the manager hands the ``drift_psi`` gate: ``(max PSI or None, detail)`` as every gate measure, and
    the whole ``report`` the gate decides on (score, Holm p and samples: the ``drifted`` verdict)."""

    report: DriftReport | None = None


def gate_value(db: Any, store_root: Path | None, name: str, version: str, devices: list[str], *, since: float,
               now: float, settings: Settings | None = None) -> GateMeasure:
    """The ``drift_psi`` gate's measure: the new version's drift report on the devices it was rolled out to,
    from the windows received since the rollout started (value None, with why, below the sample floor)."""
    settings = settings or Settings()
    wins = windows(db, model=name, version=version, since=since, devices=devices)
    rep = report(profile_of(db, store_root, name, version), name, version, "rollout", wins, settings)
    if rep.score is None:
        out = GateMeasure((None, rep.reason or "no drift data"))
    else:
        worst = rep.top[0].name if rep.top else "-"
        out = GateMeasure((rep.score, f"max PSI {rep.score:.3f} ({worst}) over {rep.samples} samples from"
                                      f" {rep.devices} device(s), Holm p={rep.p_value:.3g}"))
    out.report = rep
    return out
