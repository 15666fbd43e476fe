"""Circuit breaker: the state machine under an injected clock, and a real server around a real ONNX backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resilience_helpers import FakeClock, call, gather_artifact, gather_body, metric
from edgeml.errors import ServeError
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker


def test_consecutive_failures_open_then_half_open_probe_closes():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failures=3, open_s=5.0), clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.state == CLOSED
    b.allow()
    b.record(False)
    assert b.state == OPEN and not b.allow() and b.retry_after_s() == 5
    clock.advance(4.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()                      # one probe at a time
    b.record(True)
    assert b.state == CLOSED and b.allow()


def test_failed_probe_reopens_with_doubled_backoff_capped():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failures=1, open_s=2.0, max_open_s=5.0), clock)
    b.allow()
    b.record(False)
    waits = []
    for _ in range(3):
        waits.append(b.open_until - clock())
        clock.advance(waits[-1])
        assert b.allow() and b.state == HALF_OPEN
        b.record(False)
        assert b.state == OPEN
    assert waits == [2.0, 4.0, 5.0] and b.opened == 4
    clock.advance(5.0)
    b.allow()
    b.record(True)                            # success resets the backoff
    b.allow()
    b.record(False)
    assert b.open_until - clock() == 2.0


def test_error_rate_in_window_opens_without_consecutive_run():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failures=100, error_rate=0.5, min_requests=10, window_s=10.0), clock)
    for i in range(9):                        # alternate: never 2 failures in a row
        b.allow()
        b.record(i % 2 == 0)
    assert b.state == CLOSED                  # 9 results: under min_requests
    b.allow()
    b.record(False)                           # 10 results, 5 failed = 50 %
    assert b.state == OPEN


def test_old_results_leave_the_window():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failures=100, error_rate=0.5, min_requests=4, window_s=10.0), clock)
    for ok in (False, False, True):
        b.allow()
        b.record(ok)
    clock.advance(20.0)                       # those two failures are out of the window
    for ok in (True, True, True, False):
        b.allow()
        b.record(ok)
    assert b.state == CLOSED


def test_cancelled_probe_frees_the_slot():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failures=1, open_s=1.0), clock)
    b.allow()
    b.record(False)
    clock.advance(1.0)
    assert b.allow() and not b.allow()
    b.cancel()
    assert b.allow()


@pytest.mark.parametrize("bad", [BreakerConfig(failures=-1), BreakerConfig(error_rate=1.5),
                                 BreakerConfig(open_s=10, max_open_s=1), BreakerConfig(window_s=float("nan"))])
def test_impossible_breaker_config_is_refused(bad):
    with pytest.raises(ServeError, match="ServerConfig.breaker"):
        ServerConfig(breaker=bad).validate()


@pytest.fixture
def breaker_server(tmp_path):
    clock = FakeClock()
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "cache", breaker=BreakerConfig(failures=3, open_s=5.0)),
                      clock=clock)
    srv.load(gather_artifact(tmp_path / "gather.edgepkg", table_size=4))
    srv.start()
    yield srv, clock
    srv.stop()


def test_server_breaker_opens_refuses_fast_reports_and_recovers(breaker_server):
    srv, clock = breaker_server
    url = "/v2/models/gather/infer"
    for _ in range(3):                        # index 10 is out of the table: ONNX Runtime fails
        assert call(srv, "POST", url, gather_body(10))[0] == 500
    status, headers, data = call(srv, "POST", url, gather_body(1))
    assert status == 503 and headers["Retry-After"] == "5"
    assert "circuit breaker open" in json.loads(data)["error"] and "no working fallback" in json.loads(data)["error"]
    assert call(srv, "GET", "/v2/models/gather/ready")[0] == 503
    text = call(srv, "GET", "/metrics")[2].decode()
    assert metric(text, "edgeml_breaker_state", "gather") == 1
    assert metric(text, "edgeml_breaker_opens_total", "gather") == 1
    assert srv.models()[0]["breaker"] == "open"
    clock.advance(5.0)                        # open_s passed: the next request is a half-open probe
    assert call(srv, "GET", "/v2/models/gather/ready")[0] == 200
    status, _, data = call(srv, "POST", url, gather_body(1))
    assert status == 200
    np.testing.assert_array_equal(json.loads(data)["outputs"][0]["data"], [3, 4, 5])
    text = call(srv, "GET", "/metrics")[2].decode()
    assert metric(text, "edgeml_breaker_state", "gather") == 0


def test_bad_input_does_not_count_as_backend_failure(breaker_server):
    srv, _ = breaker_server
    bad = {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    for _ in range(5):
        assert call(srv, "POST", "/v2/models/gather/infer", bad)[0] == 400
    assert srv.models()[0]["breaker"] == "closed"


def test_breaker_off(tmp_path):
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c", breaker=BreakerConfig(failures=0)))
    srv.load(gather_artifact(tmp_path / "g.edgepkg"))
    with srv:
        for _ in range(8):
            assert call(srv, "POST", "/v2/models/gather/infer", gather_body(10))[0] == 500
        assert srv.models()[0]["breaker"] == "off"
