"""Open Inference Protocol (KServe v2) codec: JSON tensors + binary tensor data extension.

Pure functions, no I/O: ``parse_infer_request`` turns an HTTP body into numpy
feeds checked against the model's tensor specs, ``encode_infer_response``
turns outputs back into a body (JSON, or JSON header + raw bytes when binary
output is asked for). Every problem raises ``BadRequest`` whose message names
the tensor, field and what was expected; the server answers it with HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Sequence

import numpy as np

from edgeml.errors import DataError, ServeError
from edgeml.runtime.dtypes import DATATYPE_TO_DTYPE, DTYPE_TO_DATATYPE, numpy_dtype  # noqa: F401 - re-exported
from edgeml.runtime.dtypes import datatype_of as _shared_datatype_of


try:  # orjson is a base dependency; keep a stdlib fallback so a broken wheel is not fatal
    import orjson as _orjson

    def json_loads(data: bytes) -> Any:
        return _orjson.loads(data)

    def json_dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)

    JSONDecodeError: type[Exception] = _orjson.JSONDecodeError
except ImportError:  # pragma: no cover - exercised only without orjson
    import json as _json

    def json_loads(data: bytes) -> Any:
        return _json.loads(data)

    def json_dumps(obj: Any) -> bytes:
        return _json.dumps(obj, separators=(",", ":"), default=_np_default).encode()

    def _np_default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    JSONDecodeError = ValueError


class RequestError(ServeError):
    """A request the server refuses: HTTP ``status`` (gRPC maps it to a status code)."""

    default_status = 400

    def __init__(self, message: str, status: int | None = None, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status if status is not None else self.default_status


class BadRequest(RequestError):
    """The request itself is wrong (400): bad JSON, shape, datatype, value."""


class NotFound(RequestError):
    """No such endpoint (404)."""

    default_status = 404


class ModelNotFound(NotFound):
    """No such model or version (HTTP 404, gRPC NOT_FOUND)."""


class MethodNotAllowed(RequestError):
    """The endpoint exists but not for this method (405 with ``Allow``)."""

    default_status = 405

    def __init__(self, message: str, allow: str):
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(RequestError):
    """Over a per-request limit (413): body bytes or rows."""

    default_status = 413


# The v2 datatype <-> numpy map lives in edgeml.runtime.dtypes (one map for the manifest, this decoder
# and the fleet); the names are re-exported here for the transports (gRPC encodes with DTYPE_TO_DATATYPE).
_NP_DTYPES = {k: numpy_dtype(v) for k, v in DATATYPE_TO_DTYPE.items()}
# keyed by the dtype object: ``arr.dtype.name`` is a Python-level property costing ~3 us per call
DATATYPE_OF_DTYPE = {np.dtype(v): k for k, v in DATATYPE_TO_DTYPE.items()}


def datatype_of(dtype: str) -> str:
    """v2 datatype for the model metadata: the shared map, BYTES for strings/objects, else the name in capitals
    (metadata describes what the model declares; requests for such a tensor are refused by the decoder)."""
    try:
        return _shared_datatype_of(dtype)
    except DataError:
        return "BYTES" if dtype in ("object", "str", "bytes") else str(dtype).upper()


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("-1" if s is None else str(s) for s in shape) + "]"


@dataclass(slots=True)
class InferRequest:
    """A decoded, validated inference request."""

    feeds: dict[str, np.ndarray]
    rows: int                                  # size of axis 0 (the batch) of the inputs
    id: str | None = None
    outputs: list[str] | None = None           # requested output names (None = all)
    binary: dict[str, bool] = field(default_factory=dict)   # per output: send as binary?
    binary_default: bool = False


def parse_infer_request(body: bytes, header_length: int | None, model: Any,
                        max_rows: int | None = None) -> InferRequest:
    """Decode a v2 infer body for ``model`` (needs ``.input_specs``/``.output_specs`` ServeSpecs)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has only {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header, binary = body, None
    try:
        doc = json_loads(header)
    except (JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    return parse_infer_doc(doc, binary, model, max_rows)


def parse_header_length(raw: bytes) -> int:
    """``Inference-Header-Content-Length``: plain ASCII digits only (``int()`` would take "1_2", " +3")."""
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(f"Inference-Header-Content-Length {raw.decode('latin-1')!r} is not a plain non-negative "
                         "integer")
    return int(raw)


def parse_infer_doc(doc: Any, binary: Any, model: Any, max_rows: int | None = None) -> InferRequest:
    """Validate a decoded v2 request document; ``binary`` holds the bytes that inputs with
    ``parameters.binary_data_size`` take in order (None when the request has none). Shared by HTTP and gRPC.
    ``max_rows`` refuses (413) a request with more rows before its tensor data is converted."""
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request JSON needs a non-empty 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {_kind(request_id)}")
    specs = model.input_specs
    feeds: dict[str, np.ndarray] = {}
    shapes = [_checked_header(i, tensor, specs, feeds) for i, tensor in enumerate(inputs)]
    if len(feeds) != len(specs):
        missing = [n for n in specs if n not in feeds]
        raise BadRequest(f"missing input {missing[0]!r}; the model's inputs are {list(specs)}")
    rows = _rows(shapes, specs, max_rows)
    offset = 0
    for tensor, (name, shape) in zip(inputs, shapes):
        feeds[name], offset = _tensor_array(tensor, name, shape, specs[name], binary, offset)
    if binary is not None and offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data not claimed by any input")
    req = InferRequest(feeds, rows, request_id)
    req.binary_default = _flag(doc.get("parameters"), "binary_data_output", "parameters")
    _read_outputs(doc.get("outputs"), model.output_specs, req)
    return req


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    names = {bool: "a boolean", type(None): "null", str: "a string", dict: "an object", list: "a list",
             float: "a number", int: "an integer"}
    kind = names.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return kind
    return f"{kind} ({json_dumps(value)[:40].decode(errors='replace')})"


def _checked_header(i: int, tensor: Any, specs: dict[str, Any], seen: dict[str, Any]) -> tuple[str, list[int]]:
    """Check one input's name, datatype and shape against the model; return (name, shape)."""
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{i}] must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"inputs[{i}].name must be a string, got {_kind(name)}")
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"unknown input {name!r}; the model's inputs are {list(specs)}")
    if name in seen:
        raise BadRequest(f"input {name!r} is given twice")
    seen[name] = None
    datatype = tensor.get("datatype")
    want_dt = spec.datatype
    if datatype != want_dt:
        if not isinstance(datatype, str) or (datatype not in _NP_DTYPES and datatype != "BYTES"):
            raise BadRequest(f"input {name!r} has unknown datatype {datatype!r}; the model expects {want_dt}")
        raise BadRequest(f"input {name!r} has datatype {datatype}; the model expects {want_dt}")
    shape = tensor.get("shape")
    want = spec.shape
    if type(shape) is list and len(shape) == len(want):     # one pass for the usual request
        for s, w in zip(shape, want):
            if type(s) is not int or s < 0 or s >= _MAX_DIM or (w is not None and s != w):
                break
        else:
            return name, shape
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < _MAX_DIM for s in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers below 2^63, "
                         f"got {_kind(shape)}")
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        raise BadRequest(f"input {name!r} has shape {shape_text(shape)}; the model expects {shape_text(want)}")
    return name, shape


_MAX_DIM = 1 << 63


def _rows(shapes: list[tuple[str, list[int]]], specs: dict[str, Any], max_rows: int | None) -> int:
    """Rows (axis 0) shared by the batched inputs; checked before any tensor data is converted."""
    rows = -1
    for name, shape in shapes:
        if not specs[name].batched:
            continue
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            raise BadRequest(f"input {name!r} has {shape[0]} rows; other inputs have {rows}")
    if rows < 0:
        return 1                                  # fixed-shape model: one run per request
    if rows == 0:
        raise BadRequest(f"input {shapes[0][0]!r} has 0 rows (shape {shape_text(shapes[0][1])}); "
                         "send at least one row")
    if max_rows is not None and rows > max_rows:
        raise PayloadTooLarge(f"the request has {rows} rows; this server takes at most {max_rows} rows per "
                              "request: split it into smaller requests")
    return rows


def _tensor_array(tensor: dict[str, Any], name: str, shape: list[int], spec: Any, binary: Any,
                  offset: int) -> tuple[np.ndarray, int]:
    """The input's array (from the binary tail or from 'data'); return it and the new binary offset."""
    datatype, dtype = spec.datatype, spec.np_dtype
    count = 1
    for s in shape:
        count *= s
    params = tensor.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object, got {_kind(params)}")
    size = params.get("binary_data_size") if params else None
    if size is None:
        data = tensor.get("data")
        if data is None:
            raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        array = _values(name, datatype, dtype, data)
        if array.size != count:
            raise BadRequest(f"input {name!r}: shape {shape_text(shape)} needs {count} values, 'data' has {array.size}")
        return array.reshape(shape), offset
    if binary is None:
        raise BadRequest(
            f"input {name!r} has binary_data_size but the request has no Inference-Header-Content-Length header")
    if type(size) is not int or size < 0:
        raise BadRequest(f"input {name!r}: parameters.binary_data_size must be a non-negative integer, "
                         f"got {_kind(size)}")
    if offset + size > len(binary):
        raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the end of the body")
    if size != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: binary_data_size is {size} bytes; shape {shape_text(shape)} of "
                         f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape), offset + size


# JSON value types each datatype takes in 'data' (no strings such as "nan" or "1_2", no null, no booleans
# standing in for numbers: numpy would convert all of those silently).
_FLOAT_TYPES = frozenset({int, float})
_ALLOWED = {dt: (frozenset({bool}) if dt == "BOOL" else _FLOAT_TYPES if dt.startswith("FP") else frozenset({int}))
            for dt in DATATYPE_TO_DTYPE}
_ALLOWED_TEXT = {"BOOL": "true/false", "FP16": "numbers", "FP32": "numbers", "FP64": "numbers"}


def _values(name: str, datatype: str, dtype: np.dtype, data: Any) -> np.ndarray:
    """'data' (a flat or nested list) as an array of ``dtype``, refusing anything but numbers in range."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list, got {_kind(data)}")
    flat = data
    types = set(map(type, flat))
    while list in types:                       # nested rows: flatten one level at a time
        if len(types) != 1:
            raise BadRequest(f"input {name!r}: 'data' mixes lists and values at one nesting level")
        flat = list(chain.from_iterable(flat))
        types = set(map(type, flat))
    bad = types - _ALLOWED.get(datatype, _FLOAT_TYPES)
    if bad:
        example = next(v for v in flat if type(v) in bad)
        raise BadRequest(f"input {name!r}: 'data' cannot be read as {datatype}: it holds {_kind(example)}; "
                         f"give {_ALLOWED_TEXT.get(datatype, 'integers')}")
    if dtype.kind != "f":                      # integers and booleans: numpy raises on any value out of range
        try:
            return np.array(flat, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadRequest(f"input {name!r}: a value in 'data' is out of range for {datatype}: {exc}") from None
    if len(flat) <= _FAST_VALUES:
        # A short list of finite numbers within the dtype's range converts without overflow, so it needs neither
        # numpy's error state (1.6 us to enter) nor a check of the array. The sum of magnitudes bounds every value
        # and is not finite with any NaN or inf in the list (a huge int makes it raise): those, and sums past the
        # dtype's largest value, take the general path below, which reports what is wrong.
        try:
            ok = sum(map(abs, flat)) <= _FLOAT_LIMIT[dtype]      # False for NaN
        except OverflowError:
            ok = False
        if ok:
            return np.array(flat, dtype=dtype)
    try:
        with np.errstate(all="ignore"):        # overflow is reported below, as a 400
            array = np.array(flat, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input {name!r}: a value in 'data' is out of range for {datatype}: {exc}") from None
    if not np.isfinite(array).all():
        raise BadRequest(f"input {name!r}: a value in 'data' is out of range for {datatype}")
    return array


_FAST_VALUES = 4096
_FLOAT_LIMIT = {np.dtype(t): float(np.finfo(t).max) for t in ("float16", "float32", "float64")}


def _flag(params: Any, key: str, where: str) -> bool:
    """A boolean parameter: true/false only ("false" as a string is not false)."""
    if params is None:
        return False
    if not isinstance(params, dict):
        raise BadRequest(f"{where} must be an object, got {_kind(params)}")
    value = params.get(key, False)
    if type(value) is not bool:
        raise BadRequest(f"{where}.{key} must be true or false, got {_kind(value)}")
    return value


def _read_outputs(outs: Any, out_specs: dict[str, Any], req: InferRequest) -> None:
    if outs is None:
        return
    if not isinstance(outs, list):
        raise BadRequest("'outputs' must be a list of {name, parameters}")
    names = []
    for i, o in enumerate(outs):
        oname = o.get("name") if isinstance(o, dict) else None
        if not isinstance(oname, str) or oname not in out_specs:
            raise BadRequest(f"outputs[{i}]: unknown output {oname!r}; the model's outputs are {list(out_specs)}")
        names.append(oname)
        p = o.get("parameters")
        if isinstance(p, dict) and "binary_data" in p:
            req.binary[oname] = _flag(p, "binary_data", f"outputs[{i}].parameters")
        elif p is not None and not isinstance(p, dict):
            raise BadRequest(f"outputs[{i}].parameters must be an object, got {_kind(p)}")
    req.outputs = names


def encode_infer_response(
    model_name: str, model_version: str, request_id: str | None, outputs: dict[str, np.ndarray],
    req: InferRequest, output_order: Sequence[str],
) -> tuple[bytes, int | None]:
    """Return (body, header_length or None). Binary tensors follow the JSON header."""
    names = req.outputs if req.outputs is not None else output_order
    tensors = []
    blobs = []
    for name in names:
        arr = outputs[name]
        use_binary = req.binary.get(name, req.binary_default)
        dt = DATATYPE_OF_DTYPE.get(arr.dtype)
        if dt is None:
            raise ServeError(f"output {name!r} has dtype {arr.dtype}, which the v2 protocol cannot carry")
        if use_binary:
            raw = np.ascontiguousarray(arr).tobytes()
            tensors.append({"name": name, "datatype": dt, "shape": list(arr.shape),
                            "parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        else:
            flat = arr.reshape(-1)
            if arr.dtype == np.float16:
                flat = flat.astype(np.float32)
            tensors.append({"name": name, "datatype": dt, "shape": list(arr.shape), "data": flat})
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    header = json_dumps(doc)
    if blobs:
        return header + b"".join(blobs), len(header)
    return header, None


def tensor_metadata(specs: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": [-1 if d is None else d for d in s.shape]} for s in specs]
