"""Microsoft Olive's CPU optimizations of one ONNX model: the peer columns of benchmarks/compile_speed.py.

Runs INSIDE Olive's own virtual environment (``olive-ai`` with its ONNX Runtime and torch; edgeml is not
imported here), started by compile_speed.py as::

    OLIVE_PYTHON benchmarks/olive_peer.py --model M.onnx --calib CALIB.npz --out DIR [--transformer]

Each variant is one Olive workflow (``olive.workflows.run`` on a config dict, Olive's documented way to
optimize an existing ONNX model for ``CPUExecutionProvider``):

* ``olive_fp32``: ``OnnxPeepholeOptimizer`` (+ ``OrtTransformersOptimization`` for transformer encoders)
* ``olive_int8_static``: the same, then ``OnnxStaticQuantization`` (Olive's defaults: QDQ, MinMax,
  calibrated on CALIB.npz through a ``user_script`` dataset registered below)
* ``olive_int8_dynamic``: the same, then ``OnnxDynamicQuantization``

It writes DIR/olive.json: ``{variant: {"model": path, "seconds": s}}`` or ``{"error": text}`` per variant.
Latency and accuracy are measured by compile_speed.py in the main environment, in the same interleaved run
as edgeml's artifact, so both sides run on the same ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

CALIB_ENV = "EDGEML_OLIVE_CALIB"


def _register_dataset() -> None:
    """A dataset of the calibration .npz, one sample per item (Olive's dataloader batches it to 1)."""
    from olive.data.registry import Registry

    @Registry.register_dataset("edgeml_npz_calibration")
    def edgeml_npz_calibration(**_: object):
        import numpy as np
        import torch

        data = np.load(os.environ[CALIB_ENV])
        keys = [k for k in data.files if k != "labels" and not k.startswith("reference_")]
        arrays = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in keys}
        n = len(next(iter(arrays.values())))

        class _Samples(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return n

            def __getitem__(self, i: int):
                return {k: v[i] for k, v in arrays.items()}, 0

        return _Samples()


def _config(model: Path, out: Path, passes: dict, with_data: bool) -> dict:
    config: dict = {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "cpu",
                                                       "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(out / "cache"),
        "output_dir": str(out),
        "log_severity_level": 3,
        "evaluate_input_model": False,
    }
    if with_data:
        config["data_configs"] = [{"name": "calib", "type": "DataContainer", "user_script": __file__,
                                   "load_dataset_config": {"type": "edgeml_npz_calibration"}}]
    return config


def variants(transformer: bool) -> dict[str, tuple[dict, bool]]:
    base: dict = {"peephole": {"type": "OnnxPeepholeOptimizer"}}
    if transformer:
        base["transformers"] = {"type": "OrtTransformersOptimization", "model_type": "bert"}
    return {
        "olive_fp32": (dict(base), False),
        "olive_int8_static": ({**base, "quantize": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
                              True),
        "olive_int8_dynamic": ({**base, "quantize": {"type": "OnnxDynamicQuantization"}}, False),
    }


def _found_model(out: Path) -> Path:
    found = sorted(out.rglob("*.onnx"), key=lambda p: (len(p.parts), str(p)))
    found = [p for p in found if "cache" not in p.relative_to(out).parts]
    if not found:
        raise RuntimeError(f"Olive wrote no .onnx under {out}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--transformer", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    os.environ[CALIB_ENV] = str(a.calib.resolve())
    import olive
    from olive.workflows import run as olive_run

    result: dict = {"olive_version": olive.__version__}
    for name, (passes, with_data) in variants(a.transformer).items():
        out = a.out / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        types = [v["type"] for v in passes.values()]
        try:  # Olive rewrites the config it is given: hand it a copy
            olive_run(_config(a.model.resolve(), out, copy.deepcopy(passes), with_data))
            result[name] = {"model": str(_found_model(out)), "seconds": round(time.perf_counter() - t0, 2),
                            "passes": types}
        except Exception as exc:  # one failing variant must not hide the others
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "trace": traceback.format_exc()[-1500:]}
    (a.out / "olive.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:  # imported by Olive as the data config's user_script
    _register_dataset()
