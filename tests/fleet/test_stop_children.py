"""SIGTERM / SIGINT to `edgeml fleet simulate` and `edgeml fleet demo` mid-run: every process they started (the
Mosquitto broker, the simulator's child processes, the demo's agents) is gone afterwards. The issue found a
Mosquitto child of a SIGTERM'd `fleet simulate` still holding its port ten minutes later: Python's default
SIGTERM ends the process without running a single ``finally`` (fleet/simulator_procs.py ``stop_on_signals``).
Real subprocesses, real broker; processes are found through /proc (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeml.fleet.testing import wait_until

pytestmark = [pytest.mark.mqtt,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes via /proc")]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (not zombie) process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] != "Z":
            out[int(d.name)] = (int(stat[1]), cmd)
    return out


def _descendants(pid: int) -> dict[int, str]:
    procs = _processes()
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier and p not in found}
        found.update({p: procs[p][1] for p in frontier})
    return found


def _run_and_stop(cmd: list[str], workdir: Path, ready, sig: signal.Signals) -> tuple[int, dict[int, str], str]:
    """Start ``cmd``; once ``ready(children)`` holds, send ``sig``; return (exit code, the children seen, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = wait_until(lambda: kids if ready(kids := _descendants(proc.pid)) else None, 120,
                          f"the children of {' '.join(cmd[3:5])}")
        time.sleep(0.5)        # mid-run: children up and talking
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, seen, out.decode(errors="replace")


def _left_behind(seen: dict[int, str], workdir: Path) -> list[str]:
    """Processes seen as children that still run, plus any process whose command line names the run's folder."""
    live = _processes()
    left = [f"{p}: {cmd}" for p, cmd in seen.items() if p in live and live[p][1] == cmd]
    left += [f"{p}: {cmd}" for p, (_, cmd) in live.items() if str(workdir) in cmd and p not in seen]
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fleet_simulate_stopped_mid_run_leaves_no_process(mosquitto_bin, tmp_path, sig):
    work = tmp_path / "sim"
    cmd = [sys.executable, "-m", "edgeml.cli", "fleet", "simulate", "--devices", "300", "--processes", "2",
           "--bake", "0s", "--workdir", str(work)]

    def ready(kids: dict[int, str]) -> bool:
        return (any("mosquitto" in c for c in kids.values())
                and sum("edgeml.fleet.simulator_procs" in c for c in kids.values()) == 2)

    code, seen, out = _run_and_stop(cmd, work, ready, sig)
    assert code == 128 + sig, out[-2000:]
    assert f"stopped by {sig.name}" in out
    assert _left_behind(seen, work) == [], out[-2000:]


def test_fleet_demo_stopped_mid_run_leaves_no_process(mosquitto_bin, tmp_path):
    pytest.importorskip("onnx", reason="the demo builds its artifacts with onnx")
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "edgeml.cli", "fleet", "demo", "--workdir", str(work)]

    def ready(kids: dict[int, str]) -> bool:
        return (any("mosquitto" in c for c in kids.values())
                and sum(" agent " in c for c in kids.values()) == 3)

    code, seen, out = _run_and_stop(cmd, work, ready, signal.SIGTERM)
    assert code != 0, out[-2000:]         # the demo did not run to its end
    assert "done: agents, manager and broker stopped" not in out
    assert _left_behind(seen, work) == [], out[-2000:]


def test_fleet_simulate_stops_when_a_simulator_child_dies(mosquitto_bin, tmp_path):
    """kill -9 of a simulator child: the command stops waiting for its silent devices, says which child died and
    where its log is, exits non-zero, and stops everything else it started."""
    work = tmp_path / "sim"
    proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "simulate", "--devices", "300",
                             "--processes", "2", "--bake", "0s", "--workdir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    registered = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if "simulated devices registered" in lines[-1]:
                registered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert registered.wait(120), "".join(lines)[-2000:]       # mid-run: every child started, devices online
        kids = _descendants(proc.pid)
        victim = next(p for p, c in kids.items() if "simulator_procs" in c)
        os.kill(victim, signal.SIGKILL)
        proc.wait(120)
        reader.join(10)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, None), out[-2000:]
    assert f"(pid {victim}) exited with -9" in out and "sim-" in out, out[-2000:]
    assert _left_behind(kids, work) == [], out[-2000:]
