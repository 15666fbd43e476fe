"""edgeml.backends: every backend as one package, registered by one line in BACKENDS.

    backends/<name>/__init__.py   the entry: name, typed ``Options``, capabilities (light: no heavy import)
    backends/<name>/build.py      compiler side: candidates for a target, build each into artifact members
    backends/<name>/run.py        device side: open the members, run a batch
    backends/<name>/errors.py     the table from the library's exceptions to edgeml errors

The compiler (candidates, option validation), the runtime (``open_backend``) and
the CLI (``--backend`` choices) all read this registry; see docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeml.backends.base import RuntimeBackend
from edgeml.backends.entry import Backend
from edgeml.registry import Registry

BACKENDS = Registry(
    "backend",
    [
        ("onnxruntime", "edgeml.backends.onnxruntime:BACKEND"),
        ("openvino", "edgeml.backends.openvino:BACKEND"),
        ("tvm", "edgeml.backends.tvm:BACKEND"),
        ("null", "edgeml.backends.null:BACKEND"),     # test double: never picked by --backend auto
    ],
)

REFERENCE_BACKEND = "onnxruntime"   # runs the FP32 ONNX model the compiler measures candidates against


def backend_names() -> list[str]:
    """Every registered backend (the CLI's ``--backend`` choices besides ``auto``)."""
    return BACKENDS.names()


def get_backend(name: str) -> Backend:
    entry: Backend = BACKENDS.get(name)
    return entry


def all_option_names() -> dict[str, str]:
    """Backend option name -> the backend that declares it."""
    owners: dict[str, str] = {}
    for name in BACKENDS.names():
        for key in get_backend(name).option_names():
            owners.setdefault(key, name)
    return owners


def open_backend(name: str, files: Path, manifest: dict[str, Any], *, threads: int | None = None) -> RuntimeBackend:
    """Open an extracted artifact's members with backend ``name`` (imports only its ``run`` module)."""
    backend: RuntimeBackend = get_backend(name).runtime_class()(files, manifest, threads=threads)
    return backend


__all__ = ["BACKENDS", "Backend", "REFERENCE_BACKEND", "RuntimeBackend", "all_option_names", "backend_names",
           "get_backend", "open_backend"]
