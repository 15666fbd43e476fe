"""null backend, device side: numpy only. Every output = the first input, tiled to the output's shape."""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends.base import RuntimeBackend
from edgeml.errors import BackendError


class NullBackend(RuntimeBackend):
    name = "null"

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        super().__init__(files, manifest, threads=threads)
        entry = self.files / manifest["backend"]["entrypoint"]
        try:
            config = json.loads(entry.read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"null backend cannot read {entry.name}: {exc}") from exc
        if config.get("verify_fails"):
            raise BackendError("null backend: load failure requested (verify_fails)")
        self.latency_s = float(config.get("latency_ms", 0.0)) / 1000.0
        self.error = float(config.get("error", 0.0))
        self.faults = {k: config.get(k) for k in ("crash", "hang", "allocate_mb") if config.get(k)}
        self.runs_before_crash = int(config.get("crash_after") or 0)
        self._hoard: list[np.ndarray] = []
        self.outputs = [(o["name"], o.get("shape") or [None], o.get("dtype", "float32")) for o in manifest["outputs"]]

    @staticmethod
    def version() -> str:
        return "1.0"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.faults:
            self._fault()
        if self.latency_s:
            time.sleep(self.latency_s)
        first = np.asarray(next(iter(feeds.values())))
        flat = first.reshape(first.shape[0], -1).astype(np.float64)
        results = {}
        for name, shape, dtype in self.outputs:
            rest = [d if d is not None else first.shape[i + 1] if i + 1 < first.ndim else 1
                    for i, d in enumerate(shape[1:])]
            size = int(np.prod(rest)) if rest else 1
            reps = -(-size // max(flat.shape[1], 1))
            out = np.tile(flat, (1, reps))[:, :size].reshape([first.shape[0], *rest])
            results[name] = self._perturb(out, flat).astype(dtype)
        return results

    def _perturb(self, out: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """Rotate the last axis of the rows picked by a hash of each sample (same rows however batched)."""
        if self.error <= 0 or out.ndim < 2:
            return out
        picked = np.array([zlib.crc32(row.tobytes()) / 2**32 < self.error for row in flat])
        out = out.copy()
        out[picked] = np.roll(out[picked], 1, axis=-1)
        return out

    def _fault(self) -> None:
        """The test double's requested misbehaviour (compile workers only: see the package docstring)."""
        if self.faults.get("allocate_mb"):
            for _ in range(int(self.faults["allocate_mb"]) // 64):
                self._hoard.append(np.ones(64 << 17, dtype=np.float64))   # 64 MiB, every page touched
        crash = self.faults.get("crash")
        self.runs_before_crash -= 1
        if crash and self.runs_before_crash < 0:
            os.kill(os.getpid(), {"segv": signal.SIGSEGV, "ill": signal.SIGILL, "abort": signal.SIGABRT,
                                  "bus": signal.SIGBUS}[crash])
        while self.faults.get("hang"):
            time.sleep(3600)
