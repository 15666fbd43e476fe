"""OpenVINO runtime backend (IR: model.xml + model.bin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeml.backends.openvino.errors import TABLE
from edgeml.errors import MissingDependency
from edgeml.backends.base import RuntimeBackend


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependency(
            "this artifact runs on OpenVINO, which is not installed", hint="pip install openvino"
        ) from exc
    return openvino


class OpenVinoBackend(RuntimeBackend):
    name = "openvino"

    def __init__(self, files: Path, manifest: dict[str, Any], *, threads: int | None = None):
        super().__init__(files, manifest, threads=threads)
        ov = _ov()
        backend = manifest["backend"]
        options = backend.get("options", {})
        device = options.get("device", "CPU")
        # The compiler pins inference_precision (f32 unless the artifact is fp16 on GPU):
        # the CPU plugin would otherwise pick bf16 on CPUs that have it.
        config: dict[str, Any] = {"PERFORMANCE_HINT": options.get("performance_hint", "LATENCY")}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if "inference_precision" in options:
            config["INFERENCE_PRECISION_HINT"] = options["inference_precision"]
        try:
            core = ov.Core()
            model = core.read_model(str(self.files / backend["entrypoint"]))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise TABLE.map(exc, f"load the model on {device}") from exc
        self.request = self.compiled.create_infer_request()
        declared = [o.get("name") for o in manifest.get("outputs", [])]
        self.output_names = [_output_name(o, declared[i] if i < len(declared) else f"output_{i}")
                             for i, o in enumerate(self.compiled.outputs)]

    @staticmethod
    def version() -> str:
        return _ov().get_version()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            # share_inputs: no copy of the caller's arrays; outputs come back as fresh
            # numpy copies (share_outputs=False), safe to keep after the next run.
            result = self.request.infer(feeds, share_inputs=True)
        except Exception as exc:
            raise TABLE.map(exc, "run the model") from exc
        return dict(zip(self.output_names, result.to_tuple()))


def _output_name(output, fallback: str) -> str:
    try:
        return output.get_any_name()
    except RuntimeError:  # an output without a tensor name
        return fallback
