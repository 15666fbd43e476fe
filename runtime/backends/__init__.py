"""Runtime backends: open an extracted artifact and run it.

One module per backend, registered here by one line. Each module imports its
heavy package inside ``RuntimeBackend.__init__`` so loading an ONNX Runtime
artifact never imports openvino, tvm or torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.registry import Registry

RUNTIME_BACKENDS = Registry(
    "runtime backend",
    [
        ("onnxruntime", "edgeml.runtime.backends.onnxruntime:OnnxRuntimeBackend"),
        ("openvino", "edgeml.runtime.backends.openvino:OpenVinoBackend"),
        ("tvm", "edgeml.runtime.backends.tvm:TvmBackend"),
    ],
)


class RuntimeBackend(ABC):
    """A loaded model ready to run. ``files`` is the folder of verified members."""

    name: str = ""

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        self.files = Path(files)
        self.manifest = manifest
        self.threads = threads

    @staticmethod
    @abstractmethod
    def version() -> str:
        """Version of the backend package installed here."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; feeds and results are keyed by tensor name."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


def open_backend(name: str, files: Path, manifest: dict[str, Any], *, threads: int | None = None) -> RuntimeBackend:
    return RUNTIME_BACKENDS.get(name)(files, manifest, threads=threads)
