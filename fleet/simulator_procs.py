"""The simulated devices in child processes, and stopping every child on SIGTERM/SIGINT.

Why child processes: with the simulator in the manager's process, 10,000 simulated installs and the manager
shared one interpreter lock, so the whole run used ONE core of the box (profile in docs/scale.md): the
manager waited for the simulator and the simulator for the manager. ``SimulatorProcesses`` runs
``FleetSimulator`` shards as ``python -m edgeml.fleet.simulator_procs CONFIG`` (same code, same broker, each
shard its own device ids and connections), so the manager keeps its own process and core, and each side's CPU
is measured apart (``proc_cpu_s``: /proc/PID/stat of the child, of the broker).

A child is driven over its stdin/stdout, one line each way: it prints ``ready`` once its devices are connected,
answers ``versions`` with one JSON line, and stops on ``stop``, on EOF of stdin (so it never outlives its
parent, whatever killed the parent) and on SIGTERM/SIGINT.

``stop_on_signals()`` turns SIGTERM/SIGINT in the main thread into ``Terminated`` (a ``KeyboardInterrupt``), so the
``finally`` blocks of the simulator and the demos stop their brokers, agents and simulator children; a second
signal while they stop is ignored (cleanup is bounded by timeouts) instead of cutting the cleanup short and
leaving processes behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeml.errors import FleetError


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: unwind (running every ``finally``), then exit 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _Guard:
    def __init__(self) -> None:
        self.raised = False
        self.holding = False
        self.deferred: int | None = None

    def handler(self, signum: int, _frame: Any) -> None:
        if self.raised or self.deferred is not None:
            return                      # already unwinding: let the cleanup finish
        if self.holding:
            self.deferred = signum      # raised when the cleanup is done (stop_on_signals' exit)
            return
        self.raised = True
        raise Terminated(signum)


_guards: list[_Guard] = []


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``Terminated`` in the main thread for the duration; the first one only: later
    ones are ignored while the ``finally`` blocks stop child processes. A signal that arrives inside
    ``cleaning_up()`` waits until the block is done and is raised on leaving this context. Elsewhere than the
    main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _Guard()
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _guards.append(guard)
    try:
        yield
    finally:
        _guards.remove(guard)
        for s, h in previous.items():
            signal.signal(s, h)
    if guard.deferred is not None:
        raise Terminated(guard.deferred)


@contextlib.contextmanager
def cleaning_up() -> Iterator[None]:
    """Wrap a ``finally`` block that stops processes: a signal arriving inside it no longer interrupts it
    (it is raised once ``stop_on_signals`` ends). No-op outside ``stop_on_signals`` or the main thread."""
    guard = _guards[-1] if _guards and threading.current_thread() is threading.main_thread() else None
    if guard is not None:
        guard.holding = True
    yield


def stops_children_on_signals(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` inside ``stop_on_signals()`` (the demos: their ``finally`` stops broker and agents)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stop_on_signals():
            return fn(*args, **kwargs)

    return wrapper


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` used so far (0.0 when it is gone or not Linux)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def default_processes() -> int:
    """Simulator children for this host: every core but one (the manager's), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class SimulatorProcesses:
    """``FleetSimulator`` (fleet/simulator.py) split over ``processes`` children; same reads as the in-process one."""

    def __init__(self, config: Any, broker_url: str, *, processes: int, workdir: Path):
        from edgeml.fleet.simulator import SimConfig

        assert isinstance(config, SimConfig)
        self.config = config
        self.broker_url = broker_url
        self.workdir = Path(workdir)
        self.count = max(1, min(processes, config.devices))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def start(self, timeout: float = 60.0) -> "SimulatorProcesses":
        self.workdir.mkdir(parents=True, exist_ok=True)
        c = self.config
        per = -(-c.devices // self.count)
        try:
            for k in range(self.count):
                first = c.first + k * per
                n = min(per, c.first + c.devices - first)
                if n <= 0:
                    break
                ids = {f"{c.prefix}-{i:04d}" for i in range(first, first + n)}
                shard = dict(asdict(c), first=first, devices=n, failing=sorted(c.failing & ids),
                             failing_versions=sorted(c.failing_versions) if c.failing_versions is not None else None,
                             trusted_keys=[str(p) for p in c.trusted_keys],
                             state_root=str(Path(c.state_root) / f"shard-{k}") if c.state_root else None)
                conf = self.workdir / f"sim-{k}.json"
                conf.write_text(json.dumps({"broker": self.broker_url, "config": shard}))
                with open(self.workdir / f"sim-{k}.log", "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "edgeml.fleet.simulator_procs", str(conf)], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=log, start_new_session=True))
            deadline = time.monotonic() + timeout
            for k, p in enumerate(self.procs):
                line = _readline(p, deadline)
                if line != "ready":
                    tail = (self.workdir / f"sim-{k}.log").read_text(errors="replace")[-1500:]
                    why = f"exited with {p.returncode}" if p.poll() is not None else line or "no answer"
                    raise FleetError(f"simulator process {k} (pid {p.pid}) did not start ({why}); its log"
                                     f" {self.workdir / f'sim-{k}.log'} ends:\n{tail}")
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        """FleetError naming the log when a child has exited (its devices went silent: waiting is pointless)."""
        for k, p in enumerate(self.procs):
            if p.poll() is not None:
                log = self.workdir / f"sim-{k}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise FleetError(f"simulator process {k} (pid {p.pid}) exited with {p.returncode}; its log {log}"
                                 f" ends:\n{tail}")

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(p.pid) for p in self.procs)

    def versions(self, timeout: float = 30.0) -> dict[str, int]:
        """``name@version`` -> devices, as the simulated devices' journals say (asked of every child)."""
        out: dict[str, int] = {}
        with self._lock:
            deadline = time.monotonic() + timeout
            self.check()
            for p in self.procs:
                try:
                    _send(p, "versions")
                except OSError:
                    self.check()
                    raise
                line = _readline(p, deadline)
                if not line.startswith("{"):
                    raise FleetError(f"simulator process {p.pid} did not answer ({line or 'no answer'})")
                for key, n in json.loads(line).items():
                    out[key] = out.get(key, 0) + n
        return out

    def stop(self, timeout: float = 15.0) -> None:
        """Ask every child to stop (its devices disconnect cleanly), then SIGTERM, then SIGKILL what is left."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    _send(p, "stop")
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()


def _send(p: subprocess.Popen[bytes], line: str) -> None:
    assert p.stdin is not None
    p.stdin.write(line.encode() + b"\n")
    p.stdin.flush()


def _readline(p: subprocess.Popen[bytes], deadline: float) -> str:
    """One line from the child's stdout, or '' at EOF / deadline (never blocks past the deadline)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 1)     # byte by byte: nothing beyond the line is consumed (lines are short)
        if not chunk:
            return ""
        buf += chunk
    return buf.decode(errors="replace").strip()


def _child(conf_path: str) -> int:
    """A simulator child: start the shard, say ``ready``, serve ``versions`` until ``stop``/EOF/a signal."""
    import logging

    from edgeml.fleet.simulator import FleetSimulator, SimConfig
    from edgeml.fleet.transport import BrokerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(conf_path).read_text())
    raw = spec["config"]
    known = {f.name for f in fields(SimConfig)}
    kw = {k: v for k, v in raw.items() if k in known}
    kw["failing"] = set(kw.get("failing") or ())
    if kw.get("failing_versions") is not None:
        kw["failing_versions"] = set(kw["failing_versions"])
    kw["trusted_keys"] = [Path(p) for p in kw.get("trusted_keys") or ()]
    if kw.get("state_root"):
        kw["state_root"] = Path(kw["state_root"])
    sim = None
    out = sys.stdout
    with stop_on_signals():     # a signal while stopping is ignored: the devices still disconnect cleanly
        try:
            sim = FleetSimulator(SimConfig(**kw), BrokerConfig(spec["broker"])).start(timeout=30)
            out.write("ready\n")
            out.flush()
            for line in sys.stdin:      # EOF: the parent is gone, whatever stopped it
                cmd = line.strip()
                if cmd == "versions":
                    out.write(json.dumps(sim.versions()) + "\n")
                    out.flush()
                elif cmd == "stop":
                    break
        except Terminated:
            pass
        finally:
            with cleaning_up():
                if sim is not None:
                    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
