"""Fleet at scale: manager ingest rate per core, a 3-wave rollout and a rollback over simulated devices.

    python -m benchmarks.fleet_scale --devices 10000            # the issue-11 run (several minutes)
    python -m benchmarks.fleet_scale --devices 1000 --ingest 5000 --json   # the small version the test runs
    python -m edgeml.benchmarks.fleet_scale --devices 10000 --against ea8fd03   # before/after, interleaved

Prints a Markdown table. What is measured:
* ingest msgs/s per core: pre-encoded telemetry + heartbeat messages of ``--devices`` devices handed to
  ``Manager.on_messages`` in the batches the ingest writer forms (validation + database writes), divided by the
  CPU seconds the process spent (``time.process_time``): the rate one manager core sustains, on SQLite and on
  PostgreSQL (when one answers at $EDGEML_TEST_PG or 127.0.0.1:5432/test). MQTT decoding is not included.
* rollout / rollback: ``fleet.simulator.run_simulation``, the function ``edgeml fleet simulate`` runs (real
  Mosquitto, real HTTP downloads, real signature checks; model run stubbed) -- v1 to every device in waves
  5%,25%,100% (bake ``--bake``, 0 by default), then v2 failing on 20% of the devices: the gate breaches and every
  updated device is rolled back. Wall seconds, and where the CPU went: the manager's own threads, the simulator's
  child processes (``--processes``), the broker process, and the main thread polling the rollout's status.
* RSS of the manager's process, and database bytes per device after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from edgeml.fleet import protocol as P


def _messages(devices: int, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        d = f"dev-{i % devices:05d}"
        if i % 3 == 0:
            msg = {"schema_version": 1, "type": "heartbeat", "device_id": d, "ts": 1000.0 + i, "labels": {"fleet": "b"},
                   "state": "idle", "active": None, "committed_seq": -1, "refused": 0}
            out.append((P.topic(d, "heartbeat"), P.encode(msg)))
        else:
            msg = {"schema_version": 1, "type": "telemetry", "device_id": d, "ts": 1000.0 + i, "interval_s": 5.0,
                   "active": None, "cpu_percent": 3.0, "memory_mb": 40.0, "throughput_rps": 2.0,
                   "models": [{"name": "tiny", "version": "1.0.0", "requests": 10 + i, "failures": 0,
                               "latency_buckets_ms": {"1": 5, "5": 5}, "latency_sum_ms": 20.0}]}
            out.append((P.topic(d, "telemetry"), P.encode(msg)))
    return out


def ingest_rate(db: str | Path, devices: int, count: int, batch: int = 2000) -> dict:
    from edgeml.fleet.manager import Manager, ManagerConfig

    m = Manager(ManagerConfig(db=db, store_dir=Path(tempfile.mkdtemp(prefix="edgeml-bench-store-"))), None)
    msgs = _messages(devices, count)
    m.on_messages(msgs[:batch])             # warm-up: devices registered, statements prepared
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(msgs), batch):
        m.on_messages(msgs[i:i + batch])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stored = m.db.one("SELECT COUNT(*) FROM devices")[0]
    m.db.close()
    return {"messages": count, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "per_core_msgs_s": round(count / max(cpu, 1e-9)), "devices_stored": stored}


def _pg_url() -> tuple[str, str] | None:
    base = os.environ.get("EDGEML_TEST_PG", "postgresql://127.0.0.1:5432/test")
    try:
        import psycopg

        conn = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
        print(f"(PostgreSQL not measured: {str(exc).strip()[:100]})", file=sys.stderr)
        return None
    schema = f"edgeml_bench_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE SCHEMA {schema}")
    conn.close()
    return f"{base}?options=-csearch_path%3D{schema}", schema


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(os.environ.get("EDGEML_TEST_PG", "postgresql://127.0.0.1:5432/test"), autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def sqlite_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def run(devices: int, ingest: int, pg: bool, processes: int | None = None, bake_s: float = 0.0) -> dict:
    from edgeml.fleet.simulator import run_simulation

    work = Path(tempfile.mkdtemp(prefix="edgeml-fleet-scale-"))
    out: dict = {"devices": devices, "cpus": os.cpu_count()}
    out["ingest_sqlite"] = ingest_rate(work / "ingest.db", devices, ingest)
    pg_target = _pg_url() if pg else None
    if pg_target:
        try:
            out["ingest_postgres"] = ingest_rate(pg_target[0], devices, ingest)
        finally:
            _drop_schema(pg_target[1])
    # the run `edgeml fleet simulate` does (same function; the CLI's default bake is 0.5 s per wave)
    sim = run_simulation(devices=devices, fail_fraction=0.2, waves=[0.05, 0.25, 1.0], bake_s=bake_s,
                         workdir=work / "sim", echo=lambda s: print(s, file=sys.stderr), processes=processes)
    out["simulation"] = sim
    out["bake_s"] = bake_s
    out["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["db_bytes_per_device"] = round(sqlite_bytes(work / "sim" / "fleet.db") / devices)
    return out


def table(o: dict) -> str:
    v1, v2 = o["simulation"]["rollouts"]
    updated = sum(n for w in v2["per_wave"] for s, n in w.items() if s not in ("pending", "skipped"))
    rolled = v2["rollback"].get("done", 0)
    rows = [("devices (simulated, model run stubbed)", f"{o['devices']:,}"),
            ("ingest, SQLite: msgs/s per manager core", f"{o['ingest_sqlite']['per_core_msgs_s']:,}"),
            ("ingest, PostgreSQL: msgs/s per manager core",
             f"{o['ingest_postgres']['per_core_msgs_s']:,}" if "ingest_postgres" in o else "not measured"),
            ("simulator child processes (0: in the manager's process)", f"{o['simulation']['simulator_processes']}"),
            (f"3-wave rollout (bake {o.get('bake_s', 0)}): wall s / manager CPU s",
             f"{v1['seconds']} / {v1['manager_cpu_s']} ({v1['state']})"),
            ("  its CPU s: simulator / broker / status polling",
             f"{v1['simulator_cpu_s']} / {v1['broker_cpu_s']} / {v1['main_thread_cpu_s']}"),
            ("  manager CPU ms per device", f"{1000 * v1['manager_cpu_s'] / o['devices']:.2f}"),
            ("abort + roll back, 20% failing: wall s / manager CPU s",
             f"{v2['seconds']} / {v2['manager_cpu_s']} ({v2['state']})"),
            ("  its CPU s: simulator / broker / status polling",
             f"{v2['simulator_cpu_s']} / {v2['broker_cpu_s']} / {v2['main_thread_cpu_s']}"),
            ("rolled back / updated devices", f"{rolled} / {updated} ({100 * rolled / max(updated, 1):.0f}%)"),
            ("process RSS, manager (+ simulator when --processes 0) (MB)", f"{o['rss_mb']}"),
            ("SQLite bytes per device after both rollouts", f"{o['db_bytes_per_device']:,}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


AB_INGEST = r'''
import json, sys, tempfile
from pathlib import Path
from edgeml.benchmarks import fleet_scale as fs
devices, count, pg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
out = {"sqlite": fs.ingest_rate(Path(tempfile.mkdtemp()) / "i.db", devices, count)["per_core_msgs_s"]}
target = fs._pg_url() if pg else None
if target:
    try:
        out["postgres"] = fs.ingest_rate(target[0], devices, count)["per_core_msgs_s"]
    finally:
        fs._drop_schema(target[1])
print(json.dumps(out))
'''


def against(ref: str, devices: int, ingest: int, pg: bool, rounds: int) -> list[str]:
    """This working tree and ``ref`` side by side, interleaved (the order alternates per round), each measurement a
    fresh process (benchmarks/regress_sides.py puts each version first on PYTHONPATH): ingest per core and
    ``edgeml fleet simulate --devices N --bake 0s --json``. Returns the summary lines (medians, ratios)."""
    import statistics
    import subprocess

    from edgeml.benchmarks.regress_sides import base_side, head_side

    sides = [head_side(Path(tempfile.mkdtemp(prefix="edgeml-fleet-ab-"))), base_side(ref)]
    rows: dict[str, dict[str, list[float]]] = {s.label: {} for s in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            ing = json.loads(side.python(AB_INGEST, str(devices), str(ingest), "1" if pg else "0").strip().splitlines()[-1])
            p = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "simulate", "--devices", str(devices),
                                "--bake", "0s", "--json"], env=side.env, cwd=side.root, capture_output=True,
                               text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{side.label} ({side.commit[:10]}) fleet simulate: {p.stderr.strip()[-800:]}")
            v1, v2 = json.loads(p.stdout)["rollouts"]
            rec = {"v1 rollout wall s": v1["seconds"], "v1 manager CPU s": v1["manager_cpu_s"],
                   "v2 roll-back wall s": v2["seconds"], "ingest SQLite msgs/s per core": ing["sqlite"]}
            if "postgres" in ing:
                rec["ingest PostgreSQL msgs/s per core"] = ing["postgres"]
            if "simulator_cpu_s" in v1:
                rec["v1 simulator CPU s"] = v1["simulator_cpu_s"]
            print(f"round {r + 1} {side.label} ({side.commit[:10]}): "
                  + ", ".join(f"{k} {v:,}" for k, v in rec.items()), flush=True)
            for k, v in rec.items():
                rows[side.label].setdefault(k, []).append(v)
    lines = []
    for k, head in rows["head"].items():
        base = rows["base"].get(k)
        text = f"{k}: head {round(statistics.median(head), 2):,} (rounds {', '.join(f'{v:,}' for v in head)})"
        if base:
            text += (f", base {round(statistics.median(base), 2):,} (rounds {', '.join(f'{v:,}' for v in base)}),"
                     f" head/base {statistics.median(head) / statistics.median(base):.2f}")
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--ingest", type=int, default=60_000, help="messages for the ingest measurement")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON after the table")
    ap.add_argument("--processes", type=int, default=None,
                    help="simulator child processes (default: every core but one, at most 4; 0: in-process)")
    ap.add_argument("--bake", type=float, default=0.0, help="bake seconds per wave (the CLI's default is 0.5)")
    ap.add_argument("--against", metavar="REF", help="measure this tree and commit REF side by side, interleaved"
                    " (ingest + `edgeml fleet simulate --devices N --bake 0s`), instead of the table")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --against (each runs both versions)")
    a = ap.parse_args(argv)
    if not 10 <= a.devices <= 100_000 or not 1000 <= a.ingest <= 1_000_000:
        ap.error("--devices must be 10..100000 and --ingest 1000..1000000")
    if a.against:
        print("\n".join(against(a.against, a.devices, a.ingest, not a.no_postgres, max(1, a.rounds))))
        return 0
    o = run(a.devices, a.ingest, not a.no_postgres, a.processes, a.bake)
    print(table(o))
    if a.json:
        print(json.dumps(o, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
