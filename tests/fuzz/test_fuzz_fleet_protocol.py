"""Fuzz the MQTT message gate ``fleet.protocol.validate``: only MessageRejected may escape, and an
accepted message holds only the types and finite numbers its consumers rely on (issue 9 row 10)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fuzz_common import FUZZ, JSON_VALUES, deep_json
from hypothesis import example, given
from hypothesis import strategies as st

from edgeml.errors import MessageRejected
from edgeml.fleet import protocol

DEVICE = "dev-1"
ACTIVE = {"name": "mlp", "version": "1", "seq": 3, "deployment_id": "d1", "sha256": "ab" * 32}
TEMPLATES: dict[str, dict[str, Any]] = {
    "desired": {"device_id": DEVICE, "deployment_id": "d1", "seq": 3, "rollout_id": "r1", "rollback": False,
                "artifact": {"name": "mlp", "version": "1", "url": "http://127.0.0.1:1/a", "sha256": "ab" * 32,
                             "size": 10},
                "issued_at": 1.0, "health_window_s": 5},
    "presence": {"device_id": DEVICE, "online": True, "ts": 1.0, "labels": {"site": "a"}, "agent_version": "0.1",
                 "active": ACTIVE},
    "heartbeat": {"device_id": DEVICE, "ts": 1.0, "labels": {"site": "a"}, "state": "idle", "active": ACTIVE,
                  "committed_seq": 3, "deployment_id": "d1", "interval_s": 5},
    "events": {"device_id": DEVICE, "ts": 1.0, "event_seq": 1, "deployment_id": "d1", "deploy_seq": 3, "attempt": 1,
               "state": "committed", "rollout_id": "r1", "name": "mlp", "version": "1", "active": ACTIVE},
    "telemetry": {"device_id": DEVICE, "ts": 1.0, "interval_s": 5, "active": ACTIVE, "cpu_percent": 3.0,
                  "models": [{"name": "mlp", "version": "1", "requests": 10, "failures": 0,
                              "latency_buckets_ms": {"1": 4, "5": 6, "+Inf": 0}, "latency_sum_ms": 12.5}]},
}


def _message(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": protocol.SCHEMA_VERSION, "type": protocol.TYPE_FOR_KIND[kind], **body}


def _check(topic: str, payload: bytes) -> dict[str, Any] | None:
    """The property: MessageRejected or an accepted message whose telemetry numbers are usable."""
    try:
        _, kind, msg = protocol.validate(topic, payload)
    except MessageRejected:
        return None
    if kind == "telemetry":
        for model in msg["models"]:
            assert isinstance(model, dict)
            for value in (model.get("latency_buckets_ms") or {}).values():
                assert type(value) in (int, float) and math.isfinite(value) and value >= 0, value
            for key in ("requests", "failures", "latency_sum_ms"):
                if key in model:
                    assert type(model[key]) in (int, float) and math.isfinite(model[key]) and model[key] >= 0
    return msg


@st.composite
def mutated_messages(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    msg = json.loads(json.dumps(_message(kind, TEMPLATES[kind])))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "drop", "add", "model"]))
        keys = sorted(msg)
        if op == "set":
            msg[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif op == "drop":
            msg.pop(draw(st.sampled_from(keys)))
        elif op == "add":
            msg[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        elif kind == "telemetry" and isinstance(msg.get("models"), list) and msg["models"]:
            model = msg["models"][0]
            if isinstance(model, dict):
                field = draw(st.sampled_from(sorted(model) + ["latency_buckets_ms.1", "extra"]))
                if field.startswith("latency_buckets_ms.") and isinstance(model.get("latency_buckets_ms"), dict):
                    model["latency_buckets_ms"][draw(st.sampled_from(["1", "5", "+Inf", "x"]))] = draw(JSON_VALUES)
                else:
                    model[field] = draw(JSON_VALUES)
    device = draw(st.one_of(st.just(DEVICE), st.text(max_size=6)))
    topic = f"{protocol.PREFIX}/devices/{device}/{kind}"
    return topic, json.dumps(msg).encode()


@FUZZ
@given(mutated_messages())
@example((f"{protocol.PREFIX}/devices/{DEVICE}/telemetry",
          json.dumps(_message("telemetry", {**TEMPLATES["telemetry"], "models": [
              {**TEMPLATES["telemetry"]["models"][0], "latency_buckets_ms": {"1": "x"}}]})).encode()))
def test_fuzz_validate_refuses_or_accepts_usable_messages(case):
    _check(*case)


@FUZZ
@given(st.sampled_from(protocol.KINDS), st.binary(max_size=512))
def test_fuzz_validate_raw_bytes_only_message_rejected(kind, payload):
    _check(f"{protocol.PREFIX}/devices/{DEVICE}/{kind}", payload)


@FUZZ
@given(st.text(max_size=80), st.binary(max_size=64))
def test_fuzz_validate_any_topic_only_message_rejected(topic, payload):
    _check(topic, payload)


# ---- regressions: named inputs from issue 9 (rows 10) -------------------------------------------------------

@pytest.mark.parametrize("opener", ["[", "{"])
def test_regression_30000_deep_json_is_a_rejected_message_not_a_recursion_error(opener):
    with pytest.raises(MessageRejected):
        protocol.validate(f"{protocol.PREFIX}/devices/{DEVICE}/telemetry", deep_json(30_000, opener))


@pytest.mark.parametrize("bad", ["x", None, -1, True, 1e309, [1], {"a": 1}])
def test_regression_bad_latency_bucket_value_is_rejected(bad):
    model = {**TEMPLATES["telemetry"]["models"][0], "latency_buckets_ms": {"1": bad}}
    payload = json.dumps(_message("telemetry", {**TEMPLATES["telemetry"], "models": [model]})).replace(
        "Infinity", "1e309").encode()
    with pytest.raises(MessageRejected):
        protocol.validate(f"{protocol.PREFIX}/devices/{DEVICE}/telemetry", payload)


def test_regression_oversize_message_is_rejected():
    payload = json.dumps(_message("heartbeat", {**TEMPLATES["heartbeat"], "state": "x" * 70_000})).encode()
    with pytest.raises(MessageRejected):
        protocol.validate(f"{protocol.PREFIX}/devices/{DEVICE}/heartbeat", payload)
