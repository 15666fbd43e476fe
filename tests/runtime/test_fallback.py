"""Fallback chain: a second build of the model answers while the primary's breaker is open or it
fails to load; the switch is logged, counted in /metrics and in models() (what the fleet agent reads)."""

from __future__ import annotations

import json
import os
import time

import pytest

from resilience_helpers import FakeClock, call, gather_artifact, gather_body, metric
from serve_models import MLP_INPUTS, MLP_OUTPUTS, mlp_onnx, write_onnx_artifact
from edgeml.errors import ServeError
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.breaker import BreakerConfig

URL = "/v2/models/gather/infer"


def y_of(data: bytes) -> list[float]:
    return json.loads(data)["outputs"][0]["data"]


def test_open_breaker_sends_requests_to_the_fallback_and_back(tmp_path):
    clock = FakeClock()
    primary = gather_artifact(tmp_path / "gather-npu.edgepkg", table_size=4)
    fallback = gather_artifact(tmp_path / "gather-cpu.edgepkg", table_size=20, offset=1000.0)
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c", breaker=BreakerConfig(failures=2, open_s=5.0)),
                      clock=clock)
    lm = srv.load(primary, fallback=fallback)
    with srv:
        assert call(srv, "POST", URL, gather_body(1))[0] == 200
        for _ in range(2):                               # index 10: only the primary's table is too small
            assert call(srv, "POST", URL, gather_body(10))[0] == 500
        status, _, data = call(srv, "POST", URL, gather_body(10))
        assert status == 200 and y_of(data) == [1030.0, 1031.0, 1032.0]      # the fallback answered
        assert call(srv, "GET", "/v2/models/gather/ready")[0] == 200         # open, but a fallback is ready
        info = srv.models()[0]
        assert info["breaker"] == "open" and info["fallback"]["active"] is True
        assert info["fallback"]["source"] == str(fallback) and info["fallback"]["requests"] == 1
        text = call(srv, "GET", "/metrics")[2].decode()
        assert metric(text, "edgeml_fallback_active", "gather") == 1
        assert metric(text, "edgeml_fallback_switches_total", "gather") == 1
        assert metric(text, "edgeml_fallback_requests_total", "gather") == 1
        res = srv.stats("gather")["resilience"]                # what the fleet agent can forward
        assert res["fallback_active"] is True and res["breaker_state"] == "open" and res["fallback_requests"] == 1
        clock.advance(5.0)                               # backoff passed: the next request probes the primary
        status, _, data = call(srv, "POST", URL, gather_body(1))
        assert status == 200 and y_of(data) == [3.0, 4.0, 5.0]
        assert call(srv, "POST", URL, gather_body(2))[0] == 200
        assert lm.on_fallback is False and lm.fallback_switches == 2 and lm.breaker.state == "closed"


def test_primary_that_fails_to_load_is_replaced_then_retried_with_backoff(tmp_path):
    primary = tmp_path / "gather-npu.edgepkg"
    primary.write_bytes(b"not an edgepkg")               # e.g. a truncated download
    fallback = gather_artifact(tmp_path / "gather-cpu.edgepkg", table_size=20, offset=1000.0)
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c", breaker=BreakerConfig(open_s=0.2, max_open_s=0.4)))
    stand_in = srv.load(primary, fallback=fallback)
    with srv:
        info = srv.models()[0]
        assert info["fallback"]["active"] is True and info["fallback"]["primary_load_error"]
        assert y_of(call(srv, "POST", URL, gather_body(1))[2]) == [1003.0, 1004.0, 1005.0]
        text = call(srv, "GET", "/metrics")[2].decode()
        assert metric(text, "edgeml_fallback_active", "gather") == 1
        time.sleep(0.5)                                  # a retry or two fail: still the stand-in
        assert [m["version"] for m in srv.models()] == ["1"]
        fixed = gather_artifact(tmp_path / "fixed.edgepkg", table_size=4, version="2")
        os.replace(fixed, primary)                       # the primary becomes loadable
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [m["version"] for m in srv.models()] != ["2"]:
            time.sleep(0.05)
        assert [m["version"] for m in srv.models()] == ["2"] and stand_in.retired
        assert y_of(call(srv, "POST", URL, gather_body(1))[2]) == [3.0, 4.0, 5.0]


def test_manifest_names_a_sibling_fallback(tmp_path):
    gather_artifact(tmp_path / "gather-cpu.edgepkg", table_size=20, offset=1000.0)
    primary = gather_artifact(tmp_path / "gather-npu.edgepkg", runtime={"fallback": "gather-cpu.edgepkg"})
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c"))
    lm = srv.load(primary)
    assert lm.fallback is not None and lm.fallback.source == tmp_path / "gather-cpu.edgepkg"
    srv.stop()


def test_missing_or_mismatched_fallback_is_one_clear_error(tmp_path):
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c"))
    primary = gather_artifact(tmp_path / "p.edgepkg", runtime={"fallback": "absent.edgepkg"})
    with pytest.raises(ServeError, match="runtime.fallback.*absent.edgepkg"):
        srv.load(primary)
    mlp = write_onnx_artifact(tmp_path / "mlp.edgepkg", mlp_onnx(), name="mlp", version="1",
                              inputs=MLP_INPUTS, outputs=MLP_OUTPUTS)
    with pytest.raises(ServeError, match="does not match"):
        srv.load(gather_artifact(tmp_path / "q.edgepkg"), fallback=mlp)
    assert srv.models() == []                            # nothing half-loaded
    srv.stop()


@pytest.mark.parametrize("arg, needle", [("nope", "is not ART=FALLBACK"), ("other.edgepkg=x", "is not one of"),
                                         ("{art}=missing.edgepkg", "is not a file")])
def test_serve_cli_refuses_bad_fallback(tmp_path, arg, needle):
    from click.testing import CliRunner

    from edgeml.cli import main

    art = str(gather_artifact(tmp_path / "g.edgepkg"))
    res = CliRunner().invoke(main, ["serve", art, "--port", "0", "--fallback", arg.format(art=art)])
    assert res.exit_code == 2 and needle in res.output, res.output


def test_breaker_without_fallback_still_answers_503_when_fallback_breaker_open(tmp_path):
    clock = FakeClock()
    primary = gather_artifact(tmp_path / "a.edgepkg", table_size=4)
    fallback = gather_artifact(tmp_path / "b.edgepkg", table_size=4, offset=1000.0)
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "c", breaker=BreakerConfig(failures=1, open_s=5.0)),
                      clock=clock)
    srv.load(primary, fallback=fallback)
    with srv:
        assert call(srv, "POST", URL, gather_body(10))[0] == 500     # primary opens
        assert call(srv, "POST", URL, gather_body(10))[0] == 500     # fallback fails too, its breaker opens
        status, headers, _ = call(srv, "POST", URL, gather_body(1))
        assert status == 503 and headers["Retry-After"] == "5"
        assert call(srv, "GET", "/v2/models/gather/ready")[0] == 503
