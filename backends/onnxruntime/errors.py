"""ONNX Runtime exceptions -> edgeml errors (the only place that reads ORT's messages).

ORT raises unexported pybind types (``Fail``, ``InvalidGraph``, ``NotImplemented``,
``RuntimeException``, ...) whose meaning is in the text, so rules match the text.
"""

from __future__ import annotations

from edgeml.backends.errors import ErrorRule, ErrorTable
from edgeml.errors import BackendError, UnsupportedOp


def _version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


RULES = [
    ErrorRule(r"Could not find an implementation for (?P<op>\w+)\((?P<opset>\d+)\) node with name '(?P<node>[^']*)'",
              UnsupportedOp,
              "ONNX Runtime {version} has no kernel for operator {op} (opset {opset}, node '{node}'); "
              "backend onnxruntime cannot {what}",
              hint="replace the op in the source model, choose another --backend, or export with another opset"),
    ErrorRule(r"(?P<domain>[\w.]+):(?P<op>\w+)\((?P<opset>-?\d+)\) is not a registered function/op",
              UnsupportedOp,
              "operator {op} of domain {domain} is unknown to ONNX Runtime {version}; backend onnxruntime cannot {what}",
              hint="replace the custom op in the source model, or register its implementation"),
    ErrorRule(r"(?P<op>\w+)\((?P<opset>-?\d+)\) is not a registered function/op",
              UnsupportedOp,
              "operator {op} of domain ai.onnx is unknown to ONNX Runtime {version}; backend onnxruntime cannot {what}",
              hint="replace the custom op in the source model, or register its implementation"),
    ErrorRule(r"(?:Unrecognized|unknown|No Op registered for) (?:attribute: \w+ for )?(?:operator )?'?(?P<op>\w+)'? "
              r"(?:with domain_version|in domain)",
              UnsupportedOp, "backend onnxruntime cannot {what}: unsupported operator {op}: {text}",
              hint="replace the op in the source model or choose another --backend"),
    ErrorRule(r"NOT_IMPLEMENTED", UnsupportedOp,
              "backend onnxruntime cannot {what}: unsupported operator (see message): {text}",
              hint="replace the op in the source model or choose another --backend"),
    ErrorRule(r"(?i)failed to allocate memory|bad_alloc", BackendError,
              "ONNX Runtime ran out of memory trying to {what}: {text}",
              hint="use a smaller batch, fewer threads (--threads), or a smaller model"),
]

TABLE = ErrorTable("onnxruntime", RULES, version=_version, display="ONNX Runtime")


def ort_error(exc: BaseException, what: str) -> Exception:
    """The edgeml error for an ONNX Runtime exception raised while trying to ``what``."""
    return TABLE.map(exc, what)
