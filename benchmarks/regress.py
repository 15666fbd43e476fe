"""Regression guard: the working tree against BASE_REF, side by side, interleaved, with floors.

    python -m edgeml.benchmarks.regress BASE_REF                  # serve + compile + ingest (~4 minutes)
    python -m edgeml.benchmarks.regress BASE_REF --quick          # the short form (~1 minute)
    python -m edgeml.benchmarks.regress BASE_REF --only serve --echo --features --rounds 3 --duration 8

BASE_REF (a commit, tag or branch) is checked out beside the working tree (benchmarks/regress_sides.py:
a detached git worktree in the temp folder, imported through PYTHONPATH; nothing is installed). Then, in
interleaved rounds (every round runs every side once, the order rotating):

* ``serve``: the breast-cancer MLP of serve_bench served by each side, ``wrk -t1`` on loopback at each
  ``--levels`` concurrency (head with every optional feature off); ratio = head req/s / base req/s.
  ``--echo`` adds a raw uvloop+httptools server answering the same bytes (the limit of the design) and
  ``--features`` adds head with each optional feature on (breaker, cache, admission, access log).
* ``compile``: each side compiles the reference model (``edgeml.compile``, auto) once and, in a fresh process per
  round, times ``predict`` against ONNX Runtime's default session in the same process; ratio = head's speed-up
  over ORT / base's speed-up over ORT (so a slower round on the box cancels out).
* ``ingest``: ``fleet_scale.ingest_rate`` on SQLite in a fresh process per side and round; ratio = head msgs/s
  per core / base msgs/s per core. Skipped, with the reason, when BASE_REF has no such benchmark.

Each ratio is printed with its per-round spread (min..max). The guard fails (exit 1) when a ratio is below its
floor beyond the noise: every round's ratio under the floor. Floors (``--floor serve=0.95,...``): serve 0.95,
compile 0.90, ingest 0.90. Exit 2 for a bad BASE_REF or option.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLOORS = {"serve": 0.95, "compile": 0.90, "ingest": 0.90}
COMPONENTS = ("serve", "compile", "ingest")

COMPILE_DRIVER = r'''
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
import edgeml

work, onnx_path, calib, evalf, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
art = work / "model.edgepkg"
if not art.exists():
    try:                      # each version names its own best target for this host
        from edgeml.targets import best_host_target
        target = best_host_target().name
    except Exception:
        target = "x86_64"
    work.mkdir(parents=True, exist_ok=True)
    try:
        edgeml.compile(onnx_path, target=target, output=art, calib=calib, eval=evalf)
    except TypeError:
        edgeml.compile(onnx_path, target=target, output=art)
    print(json.dumps({"compiled": str(art), "target": target}))
    sys.exit(0)
model = edgeml.load(art)
feeds = {"input": np.load(evalf)["input"][:1]}
so = ort.SessionOptions()
so.log_severity_level = 3
sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
runs = {"predict": lambda: model.predict(feeds), "ort": lambda: sess.run(None, feeds)}
for fn in runs.values():
    for _ in range(20):
        fn()
times = {k: [] for k in runs}
clock = time.perf_counter
end = clock() + seconds
i = 0
while clock() < end:
    name = ("predict", "ort")[i % 2]
    fn = runs[name]
    for _ in range(10):
        t0 = clock(); fn(); times[name].append(clock() - t0)
    i += 1
p50 = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
print(json.dumps({"predict_ms": p50["predict"], "ort_ms": p50["ort"], "x_ort": p50["ort"] / p50["predict"]}))
'''

INGEST_DRIVER = r'''
import json, sys
from pathlib import Path
from edgeml.benchmarks.fleet_scale import ingest_rate
print(json.dumps(ingest_rate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
'''


def verdict(ratios: list[float], floor: float) -> dict[str, Any]:
    """Median and spread of per-round ratios; ``below`` only when every round is under the floor."""
    if not ratios:
        return {"median": None, "min": None, "max": None, "floor": floor, "below": False, "rounds": 0}
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "floor": floor, "below": max(ratios) < floor, "rounds": len(ratios)}


def _rounds(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows]


def serve_ratios(res: dict, floors: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    per = res["results"]
    for c in res["levels"]:
        head = _rounds(per["head"][str(c)], "rps")
        if "base" in per:
            base = _rounds(per["base"][str(c)], "rps")
            out.append({"metric": f"serve req/s c={c}", "what": "head / base", "gate": True,
                        **verdict([h / b for h, b in zip(head, base)], floors["serve"])})
            cpu = [b["cpu_us"] / max(h["cpu_us"], 1e-9) for h, b in zip(per["head"][str(c)], per["base"][str(c)])]
            out.append({"metric": f"serve CPU per request c={c}", "what": "base us / head us", "gate": True,
                        **verdict(cpu, floors["serve"])})
            p99 = [b["p99"] / max(h["p99"], 1e-9) for h, b in zip(per["head"][str(c)], per["base"][str(c)])]
            out.append({"metric": f"serve p99 c={c}", "what": "base p99 / head p99", "gate": False,
                        **verdict(p99, 0.0)})
        for name in per:
            if name in ("head", "base"):
                continue
            other = _rounds(per[name][str(c)], "rps")
            if name == "echo":
                cpu = [e["cpu_us"] / max(h["cpu_us"], 1e-9) for h, e in zip(per["head"][str(c)], per[name][str(c)])]
                out.append({"metric": f"serve CPU per request c={c}", "what": "raw echo us / head us", "gate": False,
                            **verdict(cpu, 0.5)})
                out.append({"metric": f"serve req/s c={c}", "what": "head / raw echo (goal >= 0.5)", "gate": False,
                            **verdict([h / e for h, e in zip(head, other)], 0.5)})
            else:
                out.append({"metric": f"serve req/s c={c}", "what": f"{name} / head (feature on / off, goal >= 0.95)",
                            "gate": False, **verdict([o / h for o, h in zip(other, head)], 0.95)})
                cpu = [h["cpu_us"] / max(o["cpu_us"], 1e-9) for h, o in zip(per["head"][str(c)], per[name][str(c)])]
                out.append({"metric": f"serve CPU per request c={c}", "what": f"head us / {name} us (goal >= 0.95)",
                            "gate": False, **verdict(cpu, 0.95)})
    return out


def run_compile(sides, work: Path, model: str, rounds: int, seconds: float, say) -> dict[str, Any]:
    from edgeml.benchmarks import models

    data_dir = work / "compile-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = models.export_onnx(model, data_dir / f"{model}.onnx", batch=1)
    data = models.write_data(model, data_dir, n_calib=64, n_eval=64)
    args = [str(onnx_path), str(data["calib"]), str(data["eval"]), str(seconds)]
    targets = {}
    for side in sides:
        say(f"compile: {side.label} compiles {model} (auto, its best target for this host)")
        done = json.loads(side.python(COMPILE_DRIVER, str(work / f"compile-{side.label}"), *args,
                                      timeout=900).splitlines()[-1])
        targets[side.label] = done["target"]
    per: dict[str, list[dict]] = {s.label: [] for s in sides}
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            row = json.loads(side.python(COMPILE_DRIVER, str(work / f"compile-{side.label}"), *args).splitlines()[-1])
            per[side.label].append(row)
            say(f"  round {r + 1} {side.label:<5} predict {row['predict_ms']:.4f} ms  ORT default "
                f"{row['ort_ms']:.4f} ms  x ORT {row['x_ort']:.3f}")
    return {"model": model, "targets": targets, "rounds": rounds, "results": per}


def run_ingest(sides, work: Path, rounds: int, count: int, say) -> dict[str, Any]:
    missing = [s for s in sides if not s.has("benchmarks/fleet_scale.py")]
    if missing:
        return {"skipped": f"{missing[0].ref} ({missing[0].commit[:10]}) has no benchmarks/fleet_scale.py"}
    per: dict[str, list[dict]] = {s.label: [] for s in sides}
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            with tempfile.TemporaryDirectory(prefix="edgeml-regress-ingest-") as tmp:
                row = json.loads(side.python(INGEST_DRIVER, str(Path(tmp) / "fleet.db"), "1000", str(count),
                                             timeout=600).splitlines()[-1])
            per[side.label].append(row)
            say(f"  round {r + 1} {side.label:<5} ingest {row['per_core_msgs_s']} msgs/s per core")
    return {"messages": count, "rounds": rounds, "results": per}


def _parse_floors(text: str | None) -> dict[str, float]:
    from edgeml.errors import UsageError

    floors = dict(FLOORS)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        try:
            if name.strip() not in floors:
                raise ValueError
            floors[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--floor {part!r}: expected NAME=NUMBER with NAME one of {', '.join(FLOORS)}") from None
    return floors


def main(argv: list[str] | None = None) -> int:
    from edgeml.errors import EdgemlError

    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.regress", description=__doc__.splitlines()[0])
    p.add_argument("base_ref", metavar="BASE_REF", help="commit, tag or branch to compare the working tree with")
    p.add_argument("--only", default=",".join(COMPONENTS), help=f"comma-separated subset of {','.join(COMPONENTS)}")
    p.add_argument("--quick", action="store_true", help="short form: c=32 only, 2 rounds, short runs (about 1 minute)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 2)")
    p.add_argument("--duration", type=float, default=None, help="seconds per serving run (default 5, --quick 2)")
    p.add_argument("--levels", default=None, help="serving connections, comma-separated (default 1,32; --quick 32)")
    p.add_argument("--echo", action="store_true", help="serve: add the raw uvloop+httptools echo server")
    p.add_argument("--features", action="store_true", help="serve: add head with each optional feature on")
    p.add_argument("--model", default="mlp", help="compile: the reference model (benchmarks/models.py)")
    p.add_argument("--floor", default=None, help="override floors, e.g. serve=1.0,ingest=0.8")
    p.add_argument("--remove-base", action="store_true",
                   help="use a checkout of BASE_REF of this run's own and delete it afterwards (default: one shared"
                        " checkout per commit in the temp folder, kept for the next run)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the whole result as JSON at the end")
    a = p.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        return _run(a, say)
    except EdgemlError as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code


def _run(a: argparse.Namespace, say) -> int:
    from edgeml.benchmarks.regress_sides import base_side, remove_base
    from edgeml.errors import UsageError

    only = [c for c in a.only.split(",") if c]
    bad = [c for c in only if c not in COMPONENTS]
    if bad or not only:
        raise UsageError(f"--only {a.only!r}: choose from {', '.join(COMPONENTS)}")
    floors = _parse_floors(a.floor)
    rounds = a.rounds or (2 if a.quick else 3)
    if rounds < 1:
        raise UsageError("--rounds must be at least 1")
    duration = a.duration or (2.0 if a.quick else 5.0)
    try:
        levels = tuple(int(c) for c in (a.levels or ("32" if a.quick else "1,32")).split(","))
    except ValueError:
        raise UsageError(f"--levels {a.levels!r}: expected comma-separated integers like 1,32") from None
    base = base_side(a.base_ref, private=a.remove_base)
    try:
        return _compare(a, say, base, only, floors, rounds, duration, levels)
    finally:
        if a.remove_base:
            remove_base(base)


def _compare(a: argparse.Namespace, say, base, only: list[str], floors: dict[str, float], rounds: int,
             duration: float, levels: tuple[int, ...]) -> int:
    from edgeml.benchmarks import regress_serve
    from edgeml.benchmarks.regress_sides import head_side

    t0 = time.perf_counter()
    out: dict[str, Any] = {"base": {"ref": a.base_ref, "commit": base.commit}, "floors": floors,
                           "host": _host(), "ratios": []}
    with tempfile.TemporaryDirectory(prefix="edgeml-regress-") as tmp:
        work = Path(tmp)
        head = head_side(work)
        out["head"] = {"commit": head.commit, "tree": str(head.tree)}
        sides = [head, base]
        say(f"regress: working tree ({head.commit[:10]}) vs {a.base_ref} ({base.commit[:10]}), {rounds} rounds")
        if "serve" in only:
            res = _guarded(lambda: regress_serve.run(sides, work / "serve", levels=levels, rounds=rounds,
                                                     duration=duration, echo=a.echo, features=a.features, say=say))
            out["serve"] = res
            if "results" in res:
                out["ratios"] += serve_ratios(res, floors)
        if "compile" in only:
            res = _guarded(lambda: run_compile(sides, work, a.model, rounds, 1.0 if a.quick else 3.0, say))
            out["compile"] = res
            if "results" in res:
                x = [h["x_ort"] / b["x_ort"] for h, b in zip(res["results"]["head"], res["results"]["base"])]
                out["ratios"].append({"metric": f"compile {a.model} predict speed-up over ORT default",
                                      "what": "head / base", "gate": True, **verdict(x, floors["compile"])})
        if "ingest" in only:
            res = _guarded(lambda: run_ingest(sides, work, rounds, 6000 if a.quick else 20000, say))
            out["ingest"] = res
            if "results" in res:
                x = [h["per_core_msgs_s"] / b["per_core_msgs_s"]
                     for h, b in zip(res["results"]["head"], res["results"]["base"])]
                out["ratios"].append({"metric": "fleet ingest msgs/s per core (SQLite)", "what": "head / base",
                                      "gate": True, **verdict(x, floors["ingest"])})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(out))
    if a.as_json:
        print(json.dumps(out, default=str))
    failed = [k for k in COMPONENTS if "failed" in out.get(k, {})]
    return 1 if failed or any(r["gate"] and r["below"] for r in out["ratios"]) else 0


def _guarded(fn) -> dict[str, Any]:
    """A component's result; the base failing to run it is a skip (older code may lack what it needs), the
    working tree failing is a failure of the guard. Either way the reason is kept, one line."""
    try:
        return fn()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        text = str(exc)
        reason = text.splitlines()[-1][:300] if text else type(exc).__name__
        if text.startswith("base "):
            return {"skipped": f"the base could not run it: {reason}"}
        return {"failed": f"the working tree could not run it: {reason}"}


def _host() -> dict[str, Any]:
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "avx512": " avx512f" in flags, "load_average": os.getloadavg()}


def table(out: dict[str, Any]) -> str:
    h = out["host"]
    lines = [f"regress: working tree ({out['head']['commit'][:10]}) vs {out['base']['ref']} "
             f"({out['base']['commit'][:10]}); {h['cpu']}, {h['cpus']} CPUs, avx512 {'yes' if h['avx512'] else 'no'}",
             f"{'metric':<46} {'ratio':>7} {'spread':>13} {'floor':>6}  verdict  ({'what'})", "-" * 100]
    for r in out["ratios"]:
        if r["median"] is None:
            continue
        state = ("BELOW" if r["below"] else "ok") if r["gate"] else "info"
        lines.append(f"{r['metric']:<46} {r['median']:>7.3f} {r['min']:>6.3f}..{r['max']:<6.3f} {r['floor']:>6.2f}  "
                     f"{state:<7}  ({r['what']}, {r['rounds']} rounds)")
    for k in COMPONENTS:
        for state in ("skipped", "failed"):
            if state in out.get(k, {}):
                lines.append(f"{k}: {state.upper() if state == 'failed' else state} ({out[k][state]})")
    below = [r["metric"] for r in out["ratios"] if r["gate"] and r["below"]]
    below += [f"{k} did not run" for k in COMPONENTS if "failed" in out.get(k, {})]
    lines.append("guard: " + ("FAILED: " + "; ".join(below) if below else
                              "passed (no gated ratio below its floor beyond the round-to-round spread)")
                 + f"; {out['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
