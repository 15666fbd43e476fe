"""The one map between v2 (KServe / Triton) datatypes and numpy dtype names.

Used by the manifest schema (which dtypes an artifact may declare), the v2
server's decoder/encoder and the fleet's probe. An unknown name is refused with
a ``DataError``; nothing silently falls back to FP32.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from edgeml.errors import DataError

if TYPE_CHECKING:  # numpy stays a runtime import of the callers that need arrays
    import numpy as np

DATATYPE_TO_DTYPE: Mapping[str, str] = MappingProxyType({
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
})
DTYPE_TO_DATATYPE: Mapping[str, str] = MappingProxyType({v: k for k, v in DATATYPE_TO_DTYPE.items()})
DTYPE_NAMES = frozenset(DTYPE_TO_DATATYPE)


def datatype_of(dtype: object) -> str:
    """v2 datatype of a numpy dtype (or its name); ``DataError`` for one v2 cannot carry."""
    name = _dtype_name(dtype)
    try:
        return DTYPE_TO_DATATYPE[name]
    except KeyError:
        raise DataError(f"dtype {name!r} has no v2 datatype; supported: {sorted(DTYPE_TO_DATATYPE)}") from None


def dtype_of(datatype: str) -> str:
    """numpy dtype name of a v2 datatype; ``DataError`` for an unknown one."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except (KeyError, TypeError):
        raise DataError(f"unknown datatype {datatype!r}; supported: {sorted(DATATYPE_TO_DTYPE)}") from None


def numpy_dtype(name: str) -> "np.dtype":
    """The numpy dtype of a supported dtype name (``float32``...); ``DataError`` otherwise."""
    import numpy as np

    if name not in DTYPE_NAMES:
        raise DataError(f"unknown dtype {name!r}; supported: {sorted(DTYPE_NAMES)}")
    return np.dtype(name)


def _dtype_name(dtype: object) -> str:
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(dtype, str):
        try:
            import numpy as np

            return np.dtype(dtype).name
        except TypeError:
            return dtype
    return str(dtype)
