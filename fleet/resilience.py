"""Resilience state of a device's model versions in fleet telemetry (issue 15: "reported in fleet telemetry").

The embedded model server counts breaker, admission and fallback events per model version
(``ModelServer.stats(...)["resilience"]`` and ``models()[i]["fallback"]``). The agent forwards a fixed,
bounded subset as the optional ``resilience`` object of each telemetry ``models`` row; the manager
validates it strictly (``wire_problem``), keeps each device's latest row per model version in its own
table (``record``) and shows it in ``edgeml fleet telemetry`` and ``edgeml fleet devices --json``.

Wire shape (every field required, nothing else allowed)::

    {"breaker_state": "closed" | "open" | "half_open" | "off",
     "breaker_opens": int, "refused_inflight": int, "refused_queue": int,
     "fallback_active": bool, "fallback_switches": int, "fallback_requests": int,
     "cache_hits": int, "cache_misses": int,
     "primary_load_error": str (<= 200 chars) | null}

Counters are cumulative since the version was loaded on the device, 0 <= n <= 2^53.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

BREAKER_STATES = ("closed", "open", "half_open", "off")     # runtime/server/breaker.py, "off" = no breaker
COUNTERS = ("breaker_opens", "refused_inflight", "refused_queue", "fallback_switches", "fallback_requests",
            "cache_hits", "cache_misses")
MAX_ERROR_CHARS = 200          # primary_load_error: enough to name the failure, bounded for the 64 KiB message
MAX_COUNT = 2 ** 53            # exact in a float and in SQLite's INTEGER (fleet/protocol.py MAX_INT)
FIELDS = ("breaker_state", *COUNTERS, "fallback_active", "primary_load_error")

_DDL = (
    "CREATE TABLE IF NOT EXISTS model_resilience (device_id TEXT NOT NULL, name TEXT NOT NULL,"
    " version TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, PRIMARY KEY (device_id, name, version))",
)


@dataclass(frozen=True)
class Resilience:
    breaker_state: str
    breaker_opens: int
    refused_inflight: int
    refused_queue: int
    fallback_switches: int
    fallback_requests: int
    cache_hits: int
    cache_misses: int
    fallback_active: bool
    primary_load_error: str | None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


def from_server(sample: Mapping[str, Any], info: Mapping[str, Any] | None) -> Resilience:
    """The wire row from the server's ``stats()["resilience"]`` and the version's ``models()`` row."""
    fallback = (info or {}).get("fallback") or {}
    error = fallback.get("primary_load_error")
    state = str(sample.get("breaker_state", "off"))
    return Resilience(
        breaker_state=state if state in BREAKER_STATES else "off",
        **{name: min(max(int(sample.get(name, 0)), 0), MAX_COUNT) for name in COUNTERS},
        fallback_active=bool(sample.get("fallback_active", False)),
        primary_load_error=str(error)[:MAX_ERROR_CHARS] if error else None)


def wire_problem(row: Any) -> str | None:
    """What is wrong with a received ``resilience`` object, or None when it is well formed."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}; expected an object"
    missing = [f for f in FIELDS if f not in row]
    if missing:
        return f"is missing {missing}"
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        return f"has unknown fields {unknown[:8]}"
    if row["breaker_state"] not in BREAKER_STATES:
        return f"breaker_state {str(row['breaker_state'])[:40]!r} is not one of {', '.join(BREAKER_STATES)}"
    for name in COUNTERS:
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            return f"{name} is {str(value)[:40]!r}; expected an integer in 0..{MAX_COUNT}"
    if not isinstance(row["fallback_active"], bool):
        return f"fallback_active has type {type(row['fallback_active']).__name__}; expected bool"
    error = row["primary_load_error"]
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_CHARS):
        return f"primary_load_error must be null or a string of at most {MAX_ERROR_CHARS} characters"
    return None


# ----------------------------------------------------------------------------- manager side
def ensure_table(conn: Any) -> None:
    """Lives beside the manager's versioned schema (as fleet/drift.py's table): created on first use."""
    for stmt in _DDL:
        conn.execute(stmt)


def record(db: Any, msg: Mapping[str, Any]) -> int:
    """Keep each device's latest validated ``resilience`` row per model version; return how many."""
    rows = [m for m in msg.get("models") or [] if "resilience" in m]
    if not rows:
        return 0
    with db.tx() as tx:
        ensure_table(tx.conn)
        for m in rows:
            tx.conn.execute("INSERT OR REPLACE INTO model_resilience VALUES (?,?,?,?,?)",
                            (msg["device_id"], m["name"], m["version"], msg["ts"],
                             json.dumps(m["resilience"], sort_keys=True, separators=(",", ":"))))
    return len(rows)


def latest(db: Any, device_id: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{device_id: {"name@version": resilience row}}`` (empty when no device has reported one)."""
    if not _table_exists(db):
        return {}
    sql, args = "SELECT * FROM model_resilience", tuple[str, ...]()
    if device_id is not None:
        sql, args = sql + " WHERE device_id = ?", (device_id,)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in db.q(sql + " ORDER BY device_id, name, version", args):
        out.setdefault(r["device_id"], {})[f"{r['name']}@{r['version']}"] = json.loads(r["state"])
    return out


def summary(row: Mapping[str, Any]) -> str:
    """One short human line: what an operator looks for (breaker not closed, fallback serving, refusals)."""
    parts = [f"breaker={row['breaker_state']}"]
    if row["fallback_active"]:
        parts.append(f"FALLBACK ({row['fallback_requests']} requests)")
    if row["refused_inflight"] or row["refused_queue"]:
        parts.append(f"refused={row['refused_inflight']}+{row['refused_queue']}")
    if row["primary_load_error"]:
        parts.append(f"primary: {row['primary_load_error'][:60]}")
    return " ".join(parts)


def _table_exists(db: Any) -> bool:
    try:
        db.q("SELECT 1 FROM model_resilience LIMIT 1")
    except Exception:  # noqa: BLE001 - sqlite3 / psycopg "no such table": nobody has reported one yet
        return False
    return True
