"""The candidate worker process: ``python -m edgeml.compiler.worker_main``.

It loads compile candidates through their backend's runtime side and runs them for the
compiler (edgeml.compiler.worker), so a candidate that crashes (SIGILL, SIGSEGV, SIGABRT,
SIGBUS), hangs or allocates without bound takes down this process, never the compile.

Protocol: one JSON request per line on stdin, one JSON answer per line on the private copy of
fd 1 (fd 1 itself is pointed at stderr, so a backend that prints cannot corrupt the protocol).
Arrays travel as ``.npy`` files in folders the parent names. Requests:

    {"op": "load", "backend", "folder", "manifest", "threads"}       -> {"ok": true, "load_s"}
    {"op": "evaluate", "inputs": DIR, "batch", "budget_s", "out": DIR} -> {"ok": true, "outputs": [names]}
    {"op": "run", "inputs": DIR, "out": DIR}                           -> the same
    {"op": "bench_feeds", "inputs": DIR, "rows"}                       -> {"ok": true}
    {"op": "warmup", "count", "max_s"}  /  {"op": "timed", "reps"}     -> {"ok": true, "times": [s, ...]}
    {"op": "unload"}                                                   -> {"ok": true}

A failure inside a request answers ``{"ok": false, "error": {"type", "message", "hint"}}``.
Test doubles that must crash this process do so from the null backend's ``run``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def save_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """Write arrays as ``<index>.npy`` (tensor names may hold any character); returns the names in order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(arrays)
    for i, name in enumerate(names):
        np.save(folder / f"{i}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
    (folder / "names.json").write_text(json.dumps(names))
    return names


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    names = json.loads((folder / "names.json").read_text())
    return {name: np.load(folder / f"{i}.npy", allow_pickle=False) for i, name in enumerate(names)}


class Worker:
    """One loaded candidate at a time; staged inputs cached by folder."""

    def __init__(self) -> None:
        self.runtime: Any = None
        self.feeds: dict[str, np.ndarray] | None = None
        self._staged: dict[str, dict[str, np.ndarray]] = {}

    def inputs(self, folder: str) -> dict[str, np.ndarray]:
        if folder not in self._staged:
            self._staged = {folder: load_arrays(Path(folder))}   # keep one set: the eval split is the only one
        return self._staged[folder]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown worker op {op!r}")
        result: dict[str, Any] = method(req)
        return result

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def op_load(self, req: dict[str, Any]) -> dict[str, Any]:
        from edgeml.backends import open_backend

        self.op_unload(req)
        start = time.perf_counter()
        self.runtime = open_backend(req["backend"], Path(req["folder"]), req["manifest"], threads=req.get("threads"))
        return {"load_s": time.perf_counter() - start}

    def op_unload(self, req: dict[str, Any]) -> dict[str, Any]:
        runtime, self.runtime, self.feeds = self.runtime, None, None
        if runtime is not None:
            runtime.close()
        return {}

    def _loaded(self) -> Any:
        if self.runtime is None:
            raise RuntimeError("no candidate is loaded in this worker")
        return self.runtime

    def op_evaluate(self, req: dict[str, Any]) -> dict[str, Any]:
        from edgeml.compiler.evaluate import run_batched

        runtime = self._loaded()
        out = run_batched(runtime.run, self.inputs(req["inputs"]), req.get("batch"), budget_s=req.get("budget_s"))
        return {"outputs": save_arrays(Path(req["out"]), out)}

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        out = self._loaded().run(load_arrays(Path(req["inputs"])))
        return {"outputs": save_arrays(Path(req["out"]), {k: np.asarray(v) for k, v in out.items()})}

    def op_bench_feeds(self, req: dict[str, Any]) -> dict[str, Any]:
        rows = int(req["rows"])
        self.feeds = {k: np.ascontiguousarray(v[:rows]) for k, v in self.inputs(req["inputs"]).items()}
        return {}

    def _bench_run(self) -> Any:
        runtime, feeds = self._loaded(), self.feeds
        if feeds is None:
            raise RuntimeError("bench_feeds was not sent before timing")
        return lambda: runtime.run(feeds)

    def op_warmup(self, req: dict[str, Any]) -> dict[str, Any]:
        """One untimed (cold) run, then up to ``count`` timed runs within about ``max_s``."""
        fn = self._bench_run()
        fn()
        times: list[float] = []
        while len(times) < int(req["count"]) and sum(times) < float(req["max_s"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return {"times": times}

    def op_timed(self, req: dict[str, Any]) -> dict[str, Any]:
        """An untimed settle run (another candidate may still hold the cores), then ``reps`` timed runs."""
        fn = self._bench_run()
        fn()
        times = []
        for _ in range(int(req["reps"])):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return {"times": times}


def _error(exc: BaseException) -> dict[str, Any]:
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {str(exc)[:400]}"
    return {"type": type(exc).__name__, "message": message, "hint": getattr(exc, "hint", None),
            "edgeml": hasattr(exc, "exit_code")}


def serve(requests: TextIO, answers: TextIO) -> None:
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        try:
            answer = {"ok": True, **worker.handle(json.loads(line))}
        except MemoryError as exc:
            answer = {"ok": False, "error": {**_error(exc), "type": "MemoryError",
                                             "message": "out of memory (MemoryError)"}}
        except Exception as exc:  # every failure is reported; only a signal ends this loop
            answer = {"ok": False, "error": _error(exc)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)            # anything a backend prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    faulthandler.enable()    # a native crash leaves its Python stack in the worker's stderr log
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
