"""TVM runtime backend (Relax VM over an exported library). Filled in by the TVM issue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import MissingDependency
from edgeml.runtime.backends import RuntimeBackend


class TvmBackend(RuntimeBackend):
    name = "tvm"

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        super().__init__(files, manifest, threads=threads)
        raise MissingDependency("the TVM runtime backend is not implemented yet", hint="see the TVM issue")

    @staticmethod
    def version() -> str:
        try:
            import tvm
        except ImportError:
            return "not installed"
        return tvm.__version__

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError
