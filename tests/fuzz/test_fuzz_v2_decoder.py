"""Fuzz the v2 request decoders of ``edgeml serve`` (JSON tensors and the binary tensor extension):
only the server's BadRequest may escape ``parse_infer_request``, and an accepted request carries
exactly the tensors, dtypes and row count it claims (issue 9 rows 1 and 11)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fuzz_common import FUZZ, JSON_VALUES, ODD_SCALARS, deep_json
from hypothesis import example, given
from hypothesis import strategies as st

from edgeml.runtime.model import TensorSpec
from edgeml.runtime.server.protocol import BadRequest, parse_infer_request
from edgeml.runtime.server.repository import LoadedModel

# The specs a real model holds (TensorSpec is what an artifact's manifest becomes): a batched float
# input, a batched int64 input and a fixed-shape float16 input, so dtype, batch and fixed-axis rules all run.
INPUTS = [{"name": "x", "dtype": "float32", "shape": [None, 4]},
          {"name": "idx", "dtype": "int64", "shape": [None, 1]}]
OUTPUTS = [{"name": "y", "dtype": "float32", "shape": [None, 2]}]
FIXED_INPUTS = [{"name": "h", "dtype": "float16", "shape": [2, 3]}]


def _served(inputs: list[dict], outputs: list[dict]) -> LoadedModel:
    specs = SimpleNamespace(inputs=[TensorSpec.from_dict(d) for d in inputs],
                            outputs=[TensorSpec.from_dict(d) for d in outputs])
    return LoadedModel(specs, "fuzz", "1", None)


BATCHED = _served(INPUTS, OUTPUTS)
FIXED = _served(FIXED_INPUTS, OUTPUTS)
DATATYPES = ["FP32", "INT64", "FP16", "BOOL", "UINT8", "BYTES", "fp32", "FP8", ""]


def _check(body: bytes, header_length: int | None, model: LoadedModel) -> None:
    """The property: BadRequest, or a request whose feeds match the model and its own row count."""
    try:
        req = parse_infer_request(body, header_length, model)
    except BadRequest as exc:
        assert 400 <= exc.status < 500, exc.status
        return
    assert set(req.feeds) == set(model.input_specs)
    for name, array in req.feeds.items():
        spec = model.input_specs[name]
        assert array.dtype == spec.np_dtype
        assert len(array.shape) == len(spec.shape)
        assert all(w is None or a == w for a, w in zip(array.shape, spec.shape))
        if header_length is None and array.dtype.kind == "f":
            # JSON has no NaN/Infinity: a non-finite value here was coerced from a string or null (row 11)
            assert np.isfinite(array).all(), array
        if spec.batched:
            # row 1: the batcher splits results by req.rows; it must be this request's own row count
            assert req.rows == array.shape[0], (req.rows, array.shape)


@st.composite
def tensors(draw, names: list[str]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    if draw(st.booleans()):
        t["name"] = draw(st.one_of(st.sampled_from(names), JSON_VALUES))
    else:
        t["name"] = names[0]
    t["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), ODD_SCALARS))
    rows = draw(st.integers(0, 3))
    cols = draw(st.sampled_from([1, 3, 4]))
    t["shape"] = draw(st.one_of(st.just([rows, cols]), st.lists(ODD_SCALARS, max_size=3),
                                st.lists(st.integers(-2, 5), max_size=3)))
    if draw(st.booleans()):
        t["data"] = draw(st.one_of(
            st.lists(st.one_of(st.floats(width=32), st.integers(-(2 ** 65), 2 ** 65), st.booleans()),
                     max_size=rows * cols + 1),
            JSON_VALUES))
    if draw(st.integers(0, 4)) == 0:
        t["parameters"] = draw(st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-1, 64), ODD_SCALARS)}), JSON_VALUES))
    return t


@st.composite
def json_requests(draw, model: LoadedModel) -> tuple[bytes, int | None]:
    names = list(model.input_specs)
    doc: dict[str, Any] = {"inputs": draw(st.lists(tensors(names), max_size=3))}
    for key in ("id", "parameters", "outputs"):
        if draw(st.integers(0, 3)) == 0:
            doc[key] = draw(st.one_of(JSON_VALUES, st.just([{"name": "y", "parameters": {"binary_data": True}}])))
    header = json.dumps(doc).encode()
    if draw(st.booleans()):
        return header, None
    tail = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(header)), st.integers(-3, len(header) + len(tail) + 3)))
    return header + tail, length


@FUZZ
@given(json_requests(BATCHED))
@example((json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4], "data": []},
                                 {"name": "idx", "datatype": "INT64", "shape": [0, 1], "data": []}]}).encode(), None))
def test_fuzz_json_and_binary_requests_batched_model(case):
    _check(*case, BATCHED)


@FUZZ
@given(json_requests(FIXED))
def test_fuzz_json_and_binary_requests_fixed_shape_model(case):
    _check(*case, FIXED)


@FUZZ
@given(st.binary(max_size=256), st.one_of(st.none(), st.integers(-5, 300)))
def test_fuzz_raw_bytes_only_bad_request(body, header_length):
    _check(body, header_length, BATCHED)


# ---- regressions: named inputs from issue 9 ---------------------------------------------------------------

@pytest.mark.parametrize("name", [{"x": 1}, ["x"], 1.5, None])
def test_regression_unhashable_or_odd_input_name_is_a_bad_request(name):
    """Row 11: ``"name": {"x": 1}`` was a TypeError (HTTP 500)."""
    body = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]})
    with pytest.raises(BadRequest):
        parse_infer_request(body.encode(), None, BATCHED)


def test_regression_zero_row_request_never_claims_a_row_it_does_not_have():
    """Row 1: ``max(rows, 1)`` made a 0-row request take one row of another client's batch."""
    _check(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4], "data": []},
                                  {"name": "idx", "datatype": "INT64", "shape": [0, 1], "data": []}]}).encode(),
           None, BATCHED)


def test_regression_deep_json_request_is_a_bad_request():
    with pytest.raises(BadRequest):
        parse_infer_request(b'{"inputs":' + deep_json(100_000) + b"}", None, BATCHED)


@pytest.mark.parametrize("tensor,value", [("x", "nan"), ("x", "-inf"), ("x", None), ("x", True), ("idx", 2 ** 70),
                                          ("idx", "1_2")])
def test_regression_non_numbers_in_data_are_bad_requests_not_coerced(tensor, value):
    """Row 11: strings, nulls and booleans became nan/1.0 silently; 2^70 must not wrap."""
    x = [value if tensor == "x" else 0, 0, 0, 0]
    idx = [value if tensor == "idx" else 0]
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x},
                                  {"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": idx}]})
    with pytest.raises(BadRequest):
        parse_infer_request(body.encode(), None, BATCHED)
