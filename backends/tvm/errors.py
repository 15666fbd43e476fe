"""TVM exceptions -> edgeml errors (importer, compiler and runtime share this one table)."""

from __future__ import annotations

from edgeml.backends.errors import ErrorRule, ErrorTable
from edgeml.errors import BackendError, ModelError, UnsupportedOp


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("apache-tvm")


RULES = [
    # tvm.error.OpNotImplemented: "... not supported in frontend ONNX: Celu"
    ErrorRule(r"(?P<ops>[^:]*)$", UnsupportedOp, "TVM's ONNX importer does not support the operators {ops}",
              hint="use another backend (--backend onnxruntime) or rewrite those ops", types=("OpNotImplemented",)),
    ErrorRule(r"(?i)cannot (?:allocate|alloc)|out of memory|bad_alloc", BackendError,
              "TVM ran out of memory trying to {what}: {text}", hint="use a smaller batch or fewer threads"),
    ErrorRule(r"(?i)undefined symbol|wrong ELF class|cannot open shared object|invalid ELF header", BackendError,
              "TVM cannot {what}: the compiled library does not fit this machine ({text})",
              hint="compile for this machine's target (edgeml targets) or run the artifact on its target"),
]

TABLE = ErrorTable("tvm", RULES, version=_version, display="TVM")

# Importing the ONNX model: anything not in the table is the model's fault, not the backend's.
IMPORT_TABLE = ErrorTable("tvm", RULES[:1], version=_version, display="TVM", fallback=ModelError)
