"""The request path's fast lanes give the same answers and the same refusals as the general code they skip.

Each lane (ORT's C++ run, one-input validation, the direct infer route, the float decoder without numpy's
error state, the lock-free loop histograms) is checked against the slower path it stands in for, on real
artifacts and a real server.
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

import edgeml
from edgeml.errors import DataError, EdgemlError
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.metrics import Histogram, LoopHistogram
from edgeml.runtime.server.protocol import BadRequest, _values
from serve_models import mlp_onnx, reference_mlp


def test_ort_fast_run_matches_session_run_and_names_a_missing_input(make_mlp_artifact, artifact_cache):
    model = edgeml.load(make_mlp_artifact(), cache_dir=artifact_cache)
    try:
        be = model.backend
        assert be._fast is not None, "a CPU-only ORT session should take the C++ run"
        x = np.random.default_rng(0).standard_normal((3, 30)).astype(np.float32)
        fast = be.run({"x": x})
        slow = dict(zip(be.output_names, be.session.run(be.output_names, {"x": x})))
        assert list(fast) == list(slow) == ["probs", "logits"]
        for name in fast:
            np.testing.assert_array_equal(fast[name], slow[name])
        with pytest.raises(EdgemlError, match="'x'"):     # fewer feeds than inputs: ORT's own message
            be.run({})
        with pytest.raises(EdgemlError, match="nope"):
            be.run({"nope": x})
    finally:
        model.close()


def test_predict_one_input_lane_refuses_what_the_general_check_refuses(make_mlp_artifact, artifact_cache):
    model = edgeml.load(make_mlp_artifact(), cache_dir=artifact_cache)
    try:
        assert model._single is not None
        x = np.zeros((2, 30), np.float32)
        want = reference_mlp(mlp_onnx(), x)
        got = model.predict({"x": x})
        np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-6)
        # an equal dtype that is not numpy's singleton object still passes (general path)
        other = np.dtype("float32").newbyteorder("=")
        assert other is not np.dtype("float32") and other == np.dtype("float32")
        assert model.predict({"x": x.view(other)})["probs"].shape == (2, 2)
        for feeds, needle in [({"x": x.astype(np.float64)}, "dtype float64"),
                              ({"x": np.zeros((2, 31), np.float32)}, "shape \\[2, 31\\]"),
                              ({"x": np.zeros((30,), np.float32)}, "shape \\[30\\]"),
                              ({"x": x, "y": x}, "unknown input 'y'"),
                              ({"y": x}, "unknown input 'y'"),
                              ({}, "missing input 'x'")]:
            with pytest.raises(DataError, match=needle):
                model.predict(feeds)
        with pytest.raises(DataError, match="dtype float64"):     # a list is converted, then checked
            model.predict({"x": x.tolist()})
    finally:
        model.close()


@pytest.mark.parametrize("data, ok", [
    ([0.5, -2, 3.25], True), ([[1.0, 2.0], [3.0, 4.0]], True), ([], True),
    ([float("nan"), 1.0], False), ([1.0, float("inf")], False), ([1e39], False), ([-1e39, 1e39], False),
    ([10 ** 400], False), ([3e38, 3e38], True),       # sum past FP32's max: the general path, still accepted
])
def test_float_decoder_fast_lane_agrees_with_the_checked_conversion(data, ok):
    if ok:
        got = _values("x", "FP32", np.dtype("float32"), data)
        np.testing.assert_array_equal(got, np.array(data, np.float32).ravel())
    else:
        with pytest.raises(BadRequest, match="out of range for FP32"):
            _values("x", "FP32", np.dtype("float32"), data)


def test_loop_histogram_counts_like_the_locked_one():
    values = [0.05, 0.1, 0.3, 7.5, 9.0, 1e6]
    a, b = Histogram((0.1, 1.0, 10.0)), LoopHistogram((0.1, 1.0, 10.0))
    for v in values:
        a.observe(v)
        b.observe(v)
    assert a.cumulative() == b.cumulative() and a.sum == b.sum and b.count == len(values)


def _post(srv, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_direct_infer_route_and_general_route_answer_alike(make_mlp_artifact, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache))
    srv.load(make_mlp_artifact(name="mlp"))
    srv.start()
    try:
        x = np.random.default_rng(1).standard_normal((1, 30)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        answers = {path: _post(srv, path, body) for path in (
            "/v2/models/mlp/infer",                 # direct lane
            "/v2/models/ml%70/infer",               # escaped: general route
            "/v2/models/mlp/infer?trace=1",         # query: general route
            "/v2/models/mlp/versions/1/infer")}     # version: general route
        outs = {p: json.loads(d)["outputs"] for p, (s, d) in answers.items()}
        assert {s for s, _ in answers.values()} == {200}
        first = outs["/v2/models/mlp/infer"]
        assert all(o == first for o in outs.values())
        assert _post(srv, "/v2/models/nope/infer", body)[0] == 404
        status, data = _post(srv, "/v2/models//infer", body)
        assert status == 404 and b"error" in data
    finally:
        srv.stop()


def test_access_log_lines_are_the_json_lines_logging_would_write(make_mlp_artifact, artifact_cache):
    """Direct lane (the server's own handler) and the logging lane (any other handler) log the same fields."""
    import io
    import logging

    from edgeml.runtime.server.logs import LOGGER, configure_logging

    stream = io.StringIO()
    logger = logging.getLogger(LOGGER)
    saved = list(logger.handlers)          # the test suite's own capture handlers would select the logging lane
    for h in saved:
        logger.removeHandler(h)
    configure_logging(stream=stream)
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, access_log=True, configure_logs=False))
    srv.load(make_mlp_artifact(name="mlp"))
    srv.start()
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]})
    try:
        for _ in range(3):
            assert _post(srv, "/v2/models/mlp/infer", body.encode())[0] == 200
        assert _post(srv, "/v2/models/mlp/infer", b"{")[0] == 400
        assert srv.plane._access is not None and srv.plane._access._handler is not None   # the direct lane
    finally:
        srv.stop()
        for h in saved:
            logger.addHandler(h)
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [d for d in docs if d["event"] == "request"]
    assert len(requests) == 3
    for d in requests:
        assert d["level"] == "info" and d["logger"] == LOGGER and d["status"] == 200 and d["model"] == "mlp"
        assert d["path"] == "/v2/models/mlp/infer" and d["method"] == "POST" and d["request_id"]
        assert d["ts"].endswith("Z") and isinstance(d["latency_ms"], float)
    assert [d["status"] for d in docs if d["event"] == "request failed"] == [400]

    # another handler on the logger: requests go through logging (that handler sees them)
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep = Keep()
    logger.addHandler(keep)
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, access_log=True, configure_logs=False))
    srv.load(make_mlp_artifact(name="mlp"))
    srv.start()
    try:
        assert _post(srv, "/v2/models/mlp/infer", body.encode())[0] == 200
    finally:
        srv.stop()
        logger.removeHandler(keep)
    seen = [r for r in keep.records if r.getMessage() == "request"]
    assert len(seen) == 1 and seen[0].status == 200 and seen[0].model == "mlp"


@pytest.mark.parametrize("formatter", ["json", "text"])
def test_access_line_is_what_the_formatter_writes_for_the_record(formatter):
    import logging

    from edgeml.runtime.server.logs import LOGGER, JsonFormatter, TextFormatter

    fmt = JsonFormatter() if formatter == "json" else TextFormatter()
    fields = {"request_id": "a-1", "method": "POST", "path": "/v2/models/m/infer", "status": 200,
              "latency_ms": 0.123456, "model": "m", "version": "1"}
    record = logging.getLogger(LOGGER).makeRecord(LOGGER, logging.INFO, __file__, 1, "request", None, None,
                                                  extra=fields)
    assert fmt.line(record.created, "request", fields) == fmt.format(record)


@pytest.mark.parametrize("peers, passes", [(1, 1), (2, 2), (None, 2)])
def test_batcher_waits_a_loop_pass_only_while_another_client_could_join(peers, passes):
    """One queued request, one open connection: it runs at the first pass; with another client (or no
    count given) the batcher gives the loop one more pass to read that client's request."""
    import asyncio

    from edgeml.runtime.server.batching import Batcher
    from edgeml.runtime.server.metrics import ModelStats

    loop = asyncio.new_event_loop()
    answered: list[int] = []
    b = Batcher(lambda feeds: {"y": feeds["x"]}, loop, ModelStats(), max_batch=8, max_delay_ms=50.0,
                peers=None if peers is None else (lambda: peers))
    try:
        b.submit({"x": np.ones((1, 2), np.float32)}, 1, lambda r, q: answered.append(1))
        ran = 0
        while not answered and ran < 3:
            loop._run_once()          # type: ignore[attr-defined]  # one pass of asyncio's own loop
            ran += 1
    finally:
        loop.close()
    assert answered == [1] and ran == passes


@pytest.mark.parametrize("formatter", ["json", "text"])
@pytest.mark.parametrize("model", ["mlp", None])
def test_access_template_is_the_generic_line(formatter, model):
    from edgeml.runtime.server.logs import JsonFormatter, TextFormatter

    fmt = JsonFormatter() if formatter == "json" else TextFormatter()
    fields = {"request_id": "7-a-1f", "method": "GET", "path": "/v2/models/m", "status": 404, "latency_ms": 12.3456}
    if model is not None:
        fields.update(model=model, version="2")
    created = 1_765_000_000.25
    assert fmt.request_line(created, "7-a-1f", "GET", "/v2/models/m", 404, 12.3456, model,
                            "2" if model else None) == fmt.line(created, "request", fields)
