"""Issue 15 row 2: the device's breaker / admission / fallback state travels in fleet telemetry.

Real parts: the embedded KServe v2 server (HttpServing) with a primary ONNX build that fails at run time and
its sibling fallback named in the manifest, real HTTP requests, the agent's telemetry message, the protocol's
validation, the manager's SQLite store and the ``edgeml fleet telemetry / devices --json`` commands.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeml.errors import MessageRejected
from edgeml.fleet import protocol as P
from edgeml.fleet.agent import AgentConfig, AgentCore
from edgeml.fleet.manager import Manager, ManagerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))   # the runtime tests' model helpers
from resilience_helpers import call, gather_artifact, gather_body  # noqa: E402


class Link:
    def __init__(self):
        self.sent = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.sent.append((topic, json.loads(payload)))
        return True


def serve_with_open_breaker(tmp_path):
    """HttpServing whose primary failed 5 times (default breaker) and whose fallback answered once."""
    from edgeml.fleet.serving import HttpServing

    gather_artifact(tmp_path / "gather-cpu.edgepkg", table_size=20, offset=1000.0)
    primary = gather_artifact(tmp_path / "gather-npu.edgepkg", table_size=4, runtime={"fallback": "gather-cpu.edgepkg"})
    serving = HttpServing(tmp_path / "cache", port=0)
    serving.activate(primary, "gather", "1")
    url = "/v2/models/gather/infer"
    for _ in range(5):                                   # index 10: only the primary's table is too small
        assert call(serving.server, "POST", url, gather_body(10))[0] == 500
    status, _, data = call(serving.server, "POST", url, gather_body(10))
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [1030.0, 1031.0, 1032.0]
    return serving


def test_resilience_state_goes_from_server_to_manager_and_cli(tmp_path):
    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server is not installed")
    serving = serve_with_open_breaker(tmp_path)
    try:
        row = serving.stats()[0]["resilience"]
        assert row["breaker_state"] == "open" and row["breaker_opens"] == 1
        assert row["fallback_active"] is True and row["fallback_switches"] == 1 and row["fallback_requests"] == 1
        assert row["refused_inflight"] == 0 and row["refused_queue"] == 0 and row["primary_load_error"] is None
        core = AgentCore(AgentConfig("dev-r", tmp_path / "state"), Link(), serving)
        tel = core.telemetry_message()
    finally:
        serving.close()
    assert tel["models"][0]["resilience"] == row
    P.validate(P.topic("dev-r", "telemetry"), P.encode(tel))

    db = tmp_path / "fleet.db"
    mgr = Manager(ManagerConfig(db=db), Link(), artifact_base_url="http://store")
    mgr.on_message(P.topic("dev-r", "telemetry"), P.encode(tel))
    runner = CliRunner()
    from edgeml.cli import main

    res = runner.invoke(main, ["fleet", "telemetry", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)["devices"][0]
    assert shown["device_id"] == "dev-r" and shown["resilience"]["gather@1"] == row
    res = runner.invoke(main, ["fleet", "telemetry", "--db", str(db)])
    assert "breaker=open FALLBACK (1 requests)" in res.output
    res = runner.invoke(main, ["fleet", "devices", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["resilience"] == {"gather@1": row}


def test_primary_load_error_is_reported(tmp_path):
    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server is not installed")
    from edgeml.fleet.serving import HttpServing

    gather_artifact(tmp_path / "gather-cpu.edgepkg", table_size=20, offset=1000.0)
    primary = gather_artifact(tmp_path / "gather-npu.edgepkg", runtime={"fallback": "gather-cpu.edgepkg"})
    broken = tmp_path / "broken" / "gather-npu.edgepkg"
    broken.parent.mkdir()
    data = bytearray(primary.read_bytes())
    data[len(data) // 2] ^= 0xFF                         # a corrupted download: the signature/hash check fails
    broken.write_bytes(bytes(data))
    (tmp_path / "gather-cpu.edgepkg").rename(broken.parent / "gather-cpu.edgepkg")
    serving = HttpServing(tmp_path / "cache", port=0)
    try:
        serving.server.load(broken, name="gather", version="1", fallback=broken.parent / "gather-cpu.edgepkg")
        row = serving._row({"name": "gather", "version": "1"})["resilience"]
    finally:
        serving.close()
    assert row["fallback_active"] is True and row["primary_load_error"]
    assert len(row["primary_load_error"]) <= 200
    P.validate(P.topic("d", "telemetry"), P.encode(_telemetry([{**_model(), "resilience": row}])))


def _model():
    return {"name": "m", "version": "1", "requests": 3, "failures": 1, "latency_buckets_ms": {"+Inf": 3},
            "latency_sum_ms": 1.5}


def _telemetry(models):
    return {"schema_version": P.SCHEMA_VERSION, "type": "telemetry", "device_id": "d", "ts": 1.0, "interval_s": 1.0,
            "models": models, "active": None}


GOOD = {"breaker_state": "half_open", "breaker_opens": 2, "refused_inflight": 7, "refused_queue": 0,
        "fallback_active": False, "fallback_switches": 2, "fallback_requests": 40, "cache_hits": 0,
        "cache_misses": 0, "primary_load_error": None}


@pytest.mark.parametrize("change, words", [
    ({"breaker_state": "melted"}, "breaker_state 'melted' is not one of closed, open, half_open, off"),
    ({"refused_queue": -1}, "refused_queue is '-1'"),
    ({"fallback_switches": True}, "fallback_switches is 'True'"),
    ({"cache_hits": 2 ** 60}, "cache_hits is"),
    ({"fallback_active": 1}, "fallback_active has type int"),
    ({"primary_load_error": "x" * 201}, "at most 200 characters"),
    ({"extra": 1}, "unknown fields ['extra']"),
    ({"breaker_state": None}, "breaker_state 'None' is not one of"),
])
def test_protocol_refuses_malformed_resilience(change, words):
    P.validate(P.topic("d", "telemetry"), P.encode(_telemetry([{**_model(), "resilience": GOOD}])))
    P.validate(P.topic("d", "telemetry"), P.encode(_telemetry([_model()])))      # optional (in-process serving)
    bad = {**copy.deepcopy(GOOD), **change}
    with pytest.raises(MessageRejected, match="models\\[0\\].resilience") as err:
        P.validate(P.topic("d", "telemetry"), P.encode(_telemetry([{**_model(), "resilience": bad}])))
    assert words in str(err.value)
    missing = {k: v for k, v in GOOD.items() if k != "refused_inflight"}
    with pytest.raises(MessageRejected, match="missing \\['refused_inflight'\\]"):
        P.validate(P.topic("d", "telemetry"), P.encode(_telemetry([{**_model(), "resilience": missing}])))
