"""OpenVINO exceptions -> edgeml errors (converter and runtime).

OpenVINO raises ``RuntimeError`` / ``OpConversionFailure`` with the reason in the text.
"""

from __future__ import annotations

from edgeml.backends.errors import ErrorRule, ErrorTable
from edgeml.errors import BackendError, ModelError, UnsupportedOp


def _version() -> str:
    import openvino

    return str(openvino.get_version())


_MISSING_OP = ErrorRule(
    r"(?:No conversion rule found for operations?|OpenVINO does not support the following ONNX operations?)"
    r"[:\s]*(?P<op>[A-Za-z0-9_.-]+)",
    UnsupportedOp, "OpenVINO cannot {what}: no conversion rule for op {op}",
    hint="use --backend onnxruntime, or replace the op in the model")

RULES = [
    _MISSING_OP,
    ErrorRule(r"(?i)(?:device with \"?(?P<device>\w+)\"? name is not registered|no GPU device|GPU plugin)",
              BackendError, "OpenVINO cannot {what}: the device {device} is not available here ({text})",
              hint="run the artifact on its target device, or compile for a CPU target"),
    ErrorRule(r"(?i)out of memory|bad_alloc|failed to allocate", BackendError,
              "OpenVINO ran out of memory trying to {what}: {text}", hint="use a smaller batch or fewer threads"),
]

TABLE = ErrorTable("openvino", RULES, version=_version, display="OpenVINO")

# Converting the ONNX model: anything not in the table is the model's fault, not the backend's.
CONVERT_TABLE = ErrorTable("openvino", [_MISSING_OP], version=_version, display="OpenVINO", fallback=ModelError)
