"""Human output shared by the commands: aligned tables, rounded figures, the candidate table, top classes.

Rules: columns are aligned from the widest cell; the last column (a reason, labels) is never padded and never
cut (--json has everything else); figures are rounded to what a person reads (``num``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns; the last column is neither padded nor cut."""
    if not rows:
        return []
    n = max(len(r) for r in rows)
    rows = [list(r) + [""] * (n - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    return [(indent + "  ".join(c.ljust(widths[i]) if i < n - 1 else c for i, c in enumerate(r))).rstrip()
            for r in rows]


def num(value: Any, digits: int = 4) -> str:
    """A figure for people: ``digits`` significant digits, no float noise (0.07139400008782104 -> 0.07139)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _verification(v: Any) -> str:
    if not v:
        return ""
    if isinstance(v, dict):
        return "verification: " + ", ".join(f"{k}={num(x)}" for k, x in v.items() if x not in (None, "", [], {}))
    return f"verification: {v}"


def candidate_rows(candidates: Iterable[dict]) -> list[str]:
    """Every candidate with whatever status it has and its full reason (verification detail appended)."""
    rows: list[Sequence[str]] = [("", "CANDIDATE", "STATUS", "ACCURACY", "DROP", "P50 MS", "P90 MS", "REASON")]
    for c in candidates:
        lat = c.get("latency_ms") or {}
        reason = "; ".join(x for x in (c.get("reason") or "", _verification(c.get("verification"))) if x)
        rows.append((
            ">" if c.get("selected") else "",
            str(c.get("label") or f"{c.get('backend')}/{c.get('precision')}"),
            str(c.get("status") or "-"),
            "-" if c.get("accuracy") is None else f"{c['accuracy']:.2f}",
            "-" if c.get("accuracy_drop") is None else f"{c['accuracy_drop']:+.2f}",
            "-" if lat.get("p50") is None else f"{lat['p50']:.3f}",
            "-" if lat.get("p90") is None else f"{lat['p90']:.3f}",
            reason,
        ))
    return table(rows)


def key_values(d: dict, skip: Iterable[str] = ()) -> str:
    """``a=1  b=x  c=[p, q]``: a flat dict for one line (never Python's repr of the dict)."""
    out = []
    for k, v in d.items():
        if k in skip or v in (None, "", [], {}):
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        out.append(f"{k}={num(v)}")
    return "  ".join(out)


def top_classes(name: str, scores: Any, k: int = 1) -> list[str]:
    """``sample 0: class 1 (p=0.99)`` per row of an [N, C] score array; probabilities by softmax unless the rows
    already are probabilities."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        return []
    is_prob = bool(np.all(s >= 0) and np.allclose(s.sum(axis=1), 1.0, atol=1e-3))
    if is_prob:
        p = s
    else:
        e = np.exp(s - s.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    lines = []
    for i, row in enumerate(p):
        order = np.argsort(-row)[:max(1, k + 1)]
        best = order[0]
        nxt = f", next {order[1]} (p={row[order[1]]:.2f})" if len(order) > 1 else ""
        lines.append(f"  sample {i}: top class {best} (p={row[best]:.2f}{nxt})")
    return [f"{name}:"] + lines
