"""OpenVINO: IR files (model.xml + model.bin) for Intel CPUs and GPUs, NNCF int8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeml.backends.entry import Backend
from edgeml.backends.options import option


@dataclass(frozen=True)
class Options:
    ov_subset_size: int = option(300, "calibration samples NNCF uses at most")
    ov_fast_bias_correction: bool = option(True, "NNCF's fast bias correction (False: the slower, finer one)")
    ov_preset: str = option("performance", "NNCF quantization preset", choices=("performance", "mixed"))
    ov_ignored_scope: dict[str, Any] | None = option(
        None, "layers NNCF leaves in float: {\"names\": [...], \"types\": [...], \"patterns\": [...]}")
    ov_accuracy_control: bool = option(True, "add the NNCF accuracy-control int8 candidate")
    ov_ac_max_iterations: int = option(8, "layer groups accuracy control may revert")


BACKEND = Backend(
    name="openvino",
    summary="OpenVINO IR for Intel CPUs and GPUs; NNCF int8 with accuracy control",
    options=Options,
    build="edgeml.backends.openvino.build:OpenVinoCompiler",
    run="edgeml.backends.openvino.run:OpenVinoBackend",
    errors="edgeml.backends.openvino.errors:TABLE",
    portable_code=True,
)
