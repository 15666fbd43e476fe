"""Candidates run in isolation: each loaded candidate lives in a worker process with a time and memory limit.

The compile pipeline never runs a candidate's native code in its own process. ``WorkerPool.open``
starts (or reuses) a worker (``python -m edgeml.compiler.worker_main``), loads the candidate there
through its backend's runtime side and hands back a ``CandidateHandle``; evaluation, the golden run
and the benchmark's timed runs all happen in that process. When the worker dies by a signal, passes
its wall-clock limit or its memory limit, the handle raises ``CandidateFailed`` whose message is
the cause in words ("illegal instruction (SIGILL) while loading", "killed after 120 s while
evaluating", "exceeded the 2048 MiB memory limit while evaluating"); the pipeline marks that
candidate ``failed`` and goes on.

A worker is reused for the next candidate only after it unloaded the previous one cleanly. The
timing stays honest: the benchmark's clock runs inside the worker, around the backend call alone,
after warm-up, so the pipe between the processes is never timed.

``CandidateHandle`` is the interface a remote device (the fleet's lab) implements too: load,
evaluate, run, set the benchmark feeds, warm up, timed runs, close. ``isolation="none"`` keeps the
old in-process handle, for the overhead benchmark (benchmarks/isolation_overhead.py) only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml import errors as edgeml_errors
from edgeml.compiler.worker_main import load_arrays, save_arrays
from edgeml.errors import BackendError, CandidateFailed, EdgemlError

ISOLATIONS = ("process", "none")
SIGNAL_WORDS = {
    signal.SIGILL: "illegal instruction (SIGILL): it executed an instruction this CPU does not have",
    signal.SIGSEGV: "segmentation fault (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "bus error (SIGBUS)",
    signal.SIGFPE: "arithmetic fault (SIGFPE)",
    signal.SIGKILL: "killed (SIGKILL; the system's out-of-memory killer does this)",
}


def default_memory_mb() -> int:
    """Half of this machine's memory: a runaway candidate must not push the compile itself out."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(512, int(line.split()[1]) // 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    return 8192


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 120.0          # wall clock per step (load, golden run, timing request)
    memory_mb: int = field(default_factory=default_memory_mb)
    poll_s: float = 0.02              # how often the worker's RSS and the clock are checked


class CandidateHandle:
    """A candidate loaded somewhere (a worker process, this process, or a device)."""

    where = "in process"

    def evaluate(self, inputs: dict[str, np.ndarray], batch: int | None,
                 budget_s: float | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def set_bench_feeds(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        raise NotImplementedError

    def warmup(self, count: int, max_s: float) -> list[float]:
        raise NotImplementedError

    def timed(self, reps: int) -> list[float]:
        raise NotImplementedError

    def peak_rss_mb(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class LocalHandle(CandidateHandle):
    """The candidate in this process (``isolation="none"``): no protection, no pipe."""

    def __init__(self, runtime: Any, clock: Callable[[], float] = time.perf_counter):
        self.runtime, self.clock = runtime, clock
        self.feeds: dict[str, np.ndarray] | None = None

    def evaluate(self, inputs: dict[str, np.ndarray], batch: int | None,
                 budget_s: float | None) -> dict[str, np.ndarray]:
        from edgeml.compiler.evaluate import run_batched

        return run_batched(self.runtime.run, inputs, batch, budget_s=budget_s)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(self.runtime.run(feeds))

    def set_bench_feeds(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        self.feeds = {k: np.ascontiguousarray(v[:rows]) for k, v in inputs.items()}

    def _once(self) -> float:
        t0 = self.clock()
        self.runtime.run(self.feeds)
        return self.clock() - t0

    def warmup(self, count: int, max_s: float) -> list[float]:
        self.runtime.run(self.feeds)
        times: list[float] = []
        while len(times) < count and sum(times) < max_s:
            times.append(self._once())
        return times

    def timed(self, reps: int) -> list[float]:
        self.runtime.run(self.feeds)
        return [self._once() for _ in range(reps)]

    def close(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()


class _Process:
    """One worker process and its line protocol, watched for time, memory and death."""

    def __init__(self, log: Path, env: dict[str, str], limits: Limits):
        self.limits = limits
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeml.compiler.worker_main"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        self._buffer = b""
        self.dead = False

    def rss_mb(self, key: str = "VmRSS") -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
        return None

    def reset_peak(self) -> None:
        try:  # "5" resets the peak RSS (VmHWM) the kernel keeps for the process
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def request(self, req: dict[str, Any], step: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(step) from None
        answer = self._read_answer(step, timeout_s)
        if not answer.get("ok"):
            raise _remote_error(answer.get("error") or {})
        return answer

    def _read_answer(self, step: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            rss = self.rss_mb()
            if rss is not None and rss > self.limits.memory_mb:
                self.kill()
                raise CandidateFailed(f"exceeded the {self.limits.memory_mb} MiB memory limit while {step} "
                                      f"(RSS reached {rss:.0f} MiB; option candidate_memory_mb)")
            if time.monotonic() > deadline:
                self.kill()
                raise CandidateFailed(f"killed after {timeout_s:g} s while {step} (still running; "
                                      "option candidate_timeout_s)")
            ready, _, _ = select.select([fd], [], [], self.limits.poll_s)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise self._died(step)
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _died(self, step: str) -> CandidateFailed:
        self.dead = True
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        if code is not None and code < 0:
            sig = signal.Signals(-code)
            words = SIGNAL_WORDS.get(sig, f"killed by {sig.name}")
            return CandidateFailed(f"{words} while {step}", signal=sig.name)
        return CandidateFailed(f"the worker process exited with code {code} while {step}")

    def kill(self) -> None:
        self.dead = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.dead or self.proc.poll() is not None:
            self.dead = True
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self.dead = True


class ProcessHandle(CandidateHandle):
    """The candidate loaded in a worker process of ``pool``."""

    where = "worker process"

    def __init__(self, pool: "WorkerPool", proc: _Process):
        self.pool = pool
        self.proc: _Process | None = proc
        self._peak: float | None = None

    def _call(self, req: dict[str, Any], step: str, timeout_s: float | None = None) -> dict[str, Any]:
        if self.proc is None:
            raise BackendError("this candidate's worker was closed")
        try:
            return self.proc.request(req, step, timeout_s or self.pool.limits.timeout_s)
        finally:
            peak = self.proc.rss_mb("VmHWM")
            if peak is not None:
                self._peak = max(self._peak or 0.0, peak)

    def _outputs(self, answer: dict[str, Any], out: Path) -> dict[str, np.ndarray]:
        arrays = load_arrays(out)
        return {name: arrays[name] for name in answer["outputs"]}

    def evaluate(self, inputs: dict[str, np.ndarray], batch: int | None,
                 budget_s: float | None) -> dict[str, np.ndarray]:
        out = self.pool.scratch_folder("out")
        limit = self.pool.limits.timeout_s + (budget_s or 0.0)
        answer = self._call({"op": "evaluate", "inputs": str(self.pool.stage(inputs)), "batch": batch,
                             "budget_s": budget_s, "out": str(out)}, "evaluating", limit)
        return self._outputs(answer, out)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        folder, out = self.pool.scratch_folder("in"), self.pool.scratch_folder("out")
        save_arrays(folder, feeds)
        return self._outputs(self._call({"op": "run", "inputs": str(folder), "out": str(out)}, "running"), out)

    def set_bench_feeds(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        self._call({"op": "bench_feeds", "inputs": str(self.pool.stage(inputs)), "rows": rows}, "benchmarking")

    def warmup(self, count: int, max_s: float) -> list[float]:
        times: list[float] = self._call({"op": "warmup", "count": count, "max_s": max_s}, "benchmarking")["times"]
        return times

    def timed(self, reps: int) -> list[float]:
        times: list[float] = self._call({"op": "timed", "reps": reps}, "benchmarking")["times"]
        return times

    def peak_rss_mb(self) -> float | None:
        return None if self._peak is None else round(self._peak, 1)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.dead:
            return
        try:
            proc.request({"op": "unload"}, "unloading", self.pool.limits.timeout_s)
        except EdgemlError:
            proc.kill()
            return
        self.pool.give_back(proc)


class WorkerPool:
    """Worker processes for one compile: started on demand, reused after a clean unload, all stopped by close."""

    def __init__(self, scratch: Path, limits: Limits | None = None, isolation: str = "process"):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation {isolation!r} is not one of {ISOLATIONS}")
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.isolation = isolation
        self._idle: list[_Process] = []
        self._all: list[_Process] = []
        self._staged: dict[int, tuple[Any, Path]] = {}
        self._count = 0

    def scratch_folder(self, kind: str) -> Path:
        self._count += 1
        return self.scratch / f"{kind}-{self._count}"

    def stage(self, inputs: dict[str, np.ndarray]) -> Path:
        """Write a set of arrays once; the same dict object is not written again."""
        staged = self._staged.get(id(inputs))
        if staged is not None and staged[0] is inputs:
            return staged[1]
        folder = self.scratch_folder("data")
        save_arrays(folder, inputs)
        self._staged[id(inputs)] = (inputs, folder)
        return folder

    def _env(self) -> dict[str, str]:
        from edgeml.targets import isolation_env

        env = {**os.environ, **isolation_env()}
        if "ONEDNN_MAX_CPU_ISA" in env and "OV_CPU_MAX_ISA" not in env:
            env["OV_CPU_MAX_ISA"] = env["ONEDNN_MAX_CPU_ISA"]   # OpenVINO's own kernels read this one
        return env

    def _process(self) -> _Process:
        while self._idle:
            proc = self._idle.pop()
            if not proc.dead and proc.proc.poll() is None:
                return proc
        proc = _Process(self.scratch / f"worker-{len(self._all)}.log", self._env(), self.limits)
        self._all.append(proc)
        return proc

    def give_back(self, proc: _Process) -> None:
        self._idle.append(proc)

    def open(self, backend: str, folder: Path, manifest: dict[str, Any], threads: int | None) -> CandidateHandle:
        """Load a candidate; raises the backend's error, or CandidateFailed when its worker dies."""
        if self.isolation == "none":
            from edgeml.backends import open_backend

            return LocalHandle(open_backend(backend, folder, manifest, threads=threads))
        proc = self._process()
        proc.reset_peak()
        handle = ProcessHandle(self, proc)
        try:
            handle._call({"op": "load", "backend": backend, "folder": str(folder), "manifest": manifest,
                          "threads": threads}, "loading")
        except BaseException:
            if not proc.dead:
                handle.close()
            raise
        return handle

    def memory_profile(self, backend: str, folder: Path, manifest: dict[str, Any], threads: int | None,
                       inputs: dict[str, np.ndarray], rows: int) -> dict[str, float] | None:
        """Resident memory of a fresh worker: before loading (the interpreter), after loading, and after
        single-stream runs at ``rows`` (what a device serving this candidate holds); None in process."""
        if self.isolation == "none":
            return None
        proc = _Process(self.scratch / f"worker-{len(self._all)}.log", self._env(), self.limits)
        self._all.append(proc)
        proc.request({"op": "ping"}, "starting", self.limits.timeout_s)
        baseline = proc.rss_mb() or 0.0
        handle = ProcessHandle(self, proc)
        handle._call({"op": "load", "backend": backend, "folder": str(folder), "manifest": manifest,
                      "threads": threads}, "loading")
        loaded = proc.rss_mb("VmHWM") or 0.0
        handle.set_bench_feeds(inputs, rows)
        handle.warmup(3, 30.0)   # one cold run + three warm ones: buffers and arenas reach their steady size
        running = proc.rss_mb("VmHWM") or 0.0
        handle.close()
        return {"baseline_mb": round(baseline, 1), "load_peak_mb": round(loaded, 1),
                "run_peak_mb": round(max(running, loaded), 1)}

    def close(self) -> None:
        for proc in self._all:
            proc.stop()
        self._idle.clear()


def _remote_error(err: dict[str, Any]) -> EdgemlError:
    """The worker's error as the same edgeml error class (message and hint kept)."""
    message, hint = str(err.get("message") or "worker error"), err.get("hint")
    if err.get("type") == "MemoryError":
        return CandidateFailed(message)
    cls = getattr(edgeml_errors, str(err.get("type")), None) if err.get("edgeml") else None
    if isinstance(cls, type) and issubclass(cls, EdgemlError):
        try:
            return cls(message, hint=hint)
        except TypeError:  # an error class with another constructor: keep the words
            pass
    return BackendError(message, hint=hint)
