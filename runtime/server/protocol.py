"""Open Inference Protocol (KServe v2) codec: JSON tensors + binary tensor data extension.

Pure functions, no I/O: ``parse_infer_request`` turns an HTTP body into numpy
feeds checked against the model's tensor specs, ``encode_infer_response``
turns outputs back into a body (JSON, or JSON header + raw bytes when binary
output is asked for). Every problem raises ``BadRequest`` whose message names
the tensor, field and what was expected; the server answers it with HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeml.errors import ServeError

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


class BadRequest(ServeError):
    """A client error: answered with ``status`` (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


# v2 datatype <-> numpy dtype name
DATATYPE_TO_DTYPE = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
DTYPE_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_DTYPE.items()}
_NP_DTYPES = {k: np.dtype(v) for k, v in DATATYPE_TO_DTYPE.items()}


def datatype_of(dtype: str) -> str:
    try:
        return DTYPE_TO_DATATYPE[str(np.dtype(dtype))]
    except (KeyError, TypeError):
        return "BYTES" if dtype in ("object", "str", "bytes") else str(dtype).upper()


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("-1" if s is None else str(s) for s in shape) + "]"


@dataclass
class InferRequest:
    """A decoded, validated inference request."""

    feeds: dict[str, np.ndarray]
    rows: int                                  # size of axis 0 (the batch) of the inputs
    id: str | None = None
    outputs: list[str] | None = None           # requested output names (None = all)
    binary: dict[str, bool] = field(default_factory=dict)   # per output: send as binary?
    binary_default: bool = False


def parse_infer_request(body: bytes, header_length: int | None, model: Any) -> InferRequest:
    """Decode a v2 infer body for ``model`` (needs ``.inputs``/``.outputs`` TensorSpecs)."""
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
    return parse_infer_doc(doc, binary, model)


def parse_infer_doc(doc: Any, binary: Any, model: Any) -> InferRequest:
    """Validate a decoded v2 request document; ``binary`` holds the bytes that inputs with
    ``parameters.binary_data_size`` take in order (None when the request has none). Shared by HTTP and gRPC."""
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request JSON needs a non-empty 'inputs' list")
    specs = model.input_specs
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    rows = -1
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = tensor.get("name")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; the model's inputs are {list(specs)}")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = tensor.get("datatype")
        want_dt = spec.datatype
        if datatype != want_dt:
            if datatype not in _NP_DTYPES and datatype != "BYTES":
                raise BadRequest(f"input {name!r} has unknown datatype {datatype!r}; the model expects {want_dt}")
            raise BadRequest(f"input {name!r} has datatype {datatype}; the model expects {want_dt}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
        want = spec.shape
        if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
            raise BadRequest(f"input {name!r} has shape {shape_text(shape)}; the model expects {shape_text(want)}")
        dtype = spec.np_dtype
        count = 1
        for s in shape:
            count *= s
        params = tensor.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if binary is None:
                raise BadRequest(
                    f"input {name!r} has binary_data_size but the request has no Inference-Header-Content-Length header"
                )
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the end of the body")
            if size != count * dtype.itemsize:
                raise BadRequest(
                    f"input {name!r}: binary_data_size is {size} bytes; shape {shape_text(shape)} of {datatype} needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            data = tensor.get("data")
            if data is None:
                raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadRequest(f"input {name!r}: 'data' cannot be read as {datatype}: {exc}") from None
            if array.size != count:
                raise BadRequest(f"input {name!r}: shape {shape_text(shape)} needs {count} values, 'data' has {array.size}")
            array = array.reshape(shape)
        feeds[name] = array
        if shape:
            if rows < 0:
                rows = shape[0]
            elif spec.batched and shape[0] != rows:
                raise BadRequest(f"input {name!r} has {shape[0]} rows; other inputs have {rows}")
    if binary is not None and offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data not claimed by any input")
    if len(feeds) != len(specs):
        missing = [n for n in specs if n not in feeds]
        raise BadRequest(f"missing input {missing[0]!r}; the model's inputs are {list(specs)}")
    req = InferRequest(feeds, max(rows, 1), doc.get("id") if isinstance(doc.get("id"), str) else None)
    params = doc.get("parameters")
    if isinstance(params, dict) and params.get("binary_data_output"):
        req.binary_default = True
    outs = doc.get("outputs")
    if outs is not None:
        if not isinstance(outs, list):
            raise BadRequest("'outputs' must be a list of {name, parameters}")
        names = []
        out_specs = model.output_specs
        for o in outs:
            oname = o.get("name") if isinstance(o, dict) else None
            if oname not in out_specs:
                raise BadRequest(f"unknown output {oname!r}; the model's outputs are {list(out_specs)}")
            names.append(oname)
            p = o.get("parameters")
            if isinstance(p, dict) and "binary_data" in p:
                req.binary[oname] = bool(p["binary_data"])
        req.outputs = names
    return req


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
        dt = DTYPE_TO_DATATYPE.get(arr.dtype.name)
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
