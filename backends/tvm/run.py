"""TVM runtime backend: ``tvm.runtime.load_module`` + the Relax virtual machine.

The artifact holds ``model/model.so`` (compiled by edgeml.backends.tvm.build,
possibly cross-compiled) and ``model/params.bin`` (weights, already transformed
for the compiled ``main``). Only runtime pieces are used here: ``tvm.runtime``
(load_module, load_param_dict, tensors, devices) and ``tvm.runtime.vm``.

When this process has not imported TVM yet, TVM is imported in runtime-only
mode (``TVM_USE_RUNTIME_LIB=1``: libtvm_runtime only, no compiler, no Relax
Python package), which is much faster on a device. Set
``EDGEML_TVM_RUNTIME_ONLY=0`` to import the full TVM instead (needed when the
same process later compiles with TVM).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends.tvm.errors import TABLE
from edgeml.errors import BackendError, MissingDependency
from edgeml.backends.base import RuntimeBackend


def import_tvm_runtime():
    """Import TVM for running only; runtime-only mode when nothing imported it yet."""
    first = "tvm" not in sys.modules and os.environ.get("EDGEML_TVM_RUNTIME_ONLY", "1") != "0"
    # TVM reads this once, at import; it is restored after, so child processes compile normally.
    set_env = first and "TVM_USE_RUNTIME_LIB" not in os.environ
    if set_env:
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    # tvm_ffi imports torch when it can (for tensor interop we never use): skip it.
    block_torch = first and "torch" not in sys.modules
    if block_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tvm.runtime
        import tvm.runtime.vm
    except ImportError as exc:
        raise MissingDependency(
            f"this artifact needs the TVM runtime, which is not installed ({exc})",
            hint="pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0",
        ) from exc
    finally:
        if block_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
        if set_env:
            os.environ.pop("TVM_USE_RUNTIME_LIB", None)
    return tvm


def _set_threads(tvm, threads: int | None) -> None:
    if not threads:
        return
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, int(threads))  # affinity mode 1 = big cores, n threads


class TvmBackend(RuntimeBackend):
    name = "tvm"

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        super().__init__(files, manifest, threads=threads)
        tvm = import_tvm_runtime()
        self._tvm = tvm
        backend = manifest["backend"]
        options = backend.get("options", {})
        device_name = options.get("device", "cpu")
        if device_name == "cuda":
            self._prepare_cuda_jit()
        try:
            self.device = tvm.runtime.device(device_name, 0)
        except Exception as exc:
            raise BackendError(f"TVM has no '{device_name}' device here: {exc}") from exc
        if device_name != "cpu" and not self.device.exist:
            raise BackendError(
                f"this artifact runs on a {device_name} device, and TVM finds none on this machine",
                hint="run it on the target device, or compile for a CPU target",
            )
        _set_threads(tvm, threads)
        library = self.files / backend["entrypoint"]
        try:
            self.module = tvm.runtime.load_module(str(library))
            self.vm = tvm.runtime.vm.VirtualMachine(self.module, self.device)
            self.main = self.vm[options.get("function", "main")]
        except Exception as exc:
            raise TABLE.map(exc, f"load {library.name}") from exc
        self.params = self._load_params(options)
        self.input_names = list(options.get("inputs") or [t["name"] for t in manifest["inputs"]])
        self.output_names = [t["name"] for t in manifest["outputs"]]
        self.static_batch = options.get("static_batch")
        self.input_shapes = options.get("input_shapes") or {}

    def _prepare_cuda_jit(self) -> None:
        """CUDA kernels ship as source (TVM 0.27): register TVM's compile callback."""
        try:
            import tvm.support.nvcc  # noqa: F401  registers tvm_callback_cuda_compile
        except Exception:
            pass
        # Runtime-only TVM does not load the CUDA runtime sidecar library; load it here.
        try:
            from tvm.base import _LOADED_LIBS
            from tvm_ffi.libinfo import load_lib_ctypes

            if "tvm_runtime_cuda" not in _LOADED_LIBS:
                runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
                _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                    package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError, KeyError, ImportError):
            pass  # no CUDA driver here: the device check below says so
        if "TVM_CUDA_COMPILE_MODE" not in os.environ:
            import importlib.util
            import shutil

            if importlib.util.find_spec("cuda") is None and shutil.which("nvcc"):
                os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"

    def _load_params(self, options: dict[str, Any]) -> list[Any]:
        tvm = self._tvm
        member = options.get("params")
        if not member:
            return []
        path = self.files / member
        try:
            loaded = tvm.runtime.load_param_dict_from_file(str(path))
        except Exception as exc:
            raise BackendError(f"TVM could not read the parameters {member}: {exc}") from exc
        names = sorted(loaded.keys())
        expected = options.get("num_params")
        if expected is not None and len(names) != int(expected):
            raise BackendError(f"{member} holds {len(names)} parameters; the manifest says {expected}")
        params = [loaded[n] for n in names]
        if self.device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
            params = [p.copyto(self.device) for p in params]
        return params

    @staticmethod
    def version() -> str:
        try:
            from importlib.metadata import version

            return version("apache-tvm")
        except Exception:
            try:
                import tvm

                return tvm.__version__
            except ImportError:
                return "not installed"

    def _run_once(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), self.device) for n in self.input_names]
        try:
            result = self.main(*args, *self.params)
        except Exception as exc:
            raise TABLE.map(exc, "run the model") from exc
        if hasattr(result, "numpy"):
            return [result.numpy()]
        return [result[i].numpy() for i in range(len(result))]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"missing input {missing[0]!r} for the TVM model (inputs: {self.input_names})")
        batch = self.static_batch
        first = feeds[self.input_names[0]]
        if batch and first.ndim and first.shape[0] != batch:
            # Compiled for a fixed batch (tuned builds): run it slice by slice.
            n = first.shape[0]
            if n % batch:
                raise BackendError(f"this TVM build runs batches of {batch}; got {n} samples")
            parts = [self._run_once({k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
            outputs = [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]
        else:
            outputs = self._run_once(feeds)
        return dict(zip(self.output_names, outputs))
