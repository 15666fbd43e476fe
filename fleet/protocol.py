"""The fleet wire protocol: topics, message schemas, validation, signing.

Every message is one UTF-8 JSON object with ``schema_version`` and ``type``.
The topic tree (see docs/fleet-protocol.md)::

    edgeml/v1/devices/{id}/desired     manager -> agent  retained, QoS 1   (desired deployment)
    edgeml/v1/devices/{id}/presence    agent  -> all     retained, QoS 1   (birth; Last Will = offline)
    edgeml/v1/devices/{id}/heartbeat   agent  -> manager QoS 0             (liveness + state summary)
    edgeml/v1/devices/{id}/events      agent  -> manager QoS 1             (install state transitions)
    edgeml/v1/devices/{id}/telemetry   agent  -> manager QoS 0             (counters + histograms)

``validate(topic, payload)`` is the one gate every received message passes:
it refuses oversized payloads, non-JSON, unknown schema versions, wrong
types, missing or mistyped fields and a device id that does not match the
topic, raising ``MessageRejected`` with the reason. Signatures (optional,
manager -> agent) are Ed25519 over the canonical JSON of the message without
its ``sig`` field.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from edgeml.errors import MessageRejected, SignatureError

SCHEMA_VERSION = 1
PREFIX = "edgeml/v1"
MAX_MESSAGE_BYTES = 64 * 1024
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
KINDS = ("desired", "presence", "heartbeat", "events", "telemetry")
# Fixed latency bucket upper bounds (ms): every agent uses the same edges, so the
# manager can add histograms from many devices (never average percentiles).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# install states reported in events, in order
INSTALL_STATES = ("received", "downloading", "verifying", "staged", "selftest", "swapped", "health", "committed")
FINAL_STATES = ("committed", "failed", "rolled_back", "refused")
EVENT_STATES = INSTALL_STATES + ("failed", "rolled_back", "refused")


def topic(device_id: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{PREFIX}/devices/{device_id}/{kind}"


def wildcard(kind: str) -> str:
    return f"{PREFIX}/devices/+/{kind}"


def parse_topic(t: str) -> tuple[str, str]:
    """``edgeml/v1/devices/ID/KIND`` -> (ID, KIND); MessageRejected otherwise."""
    parts = t.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices" or parts[4] not in KINDS:
        raise MessageRejected(f"topic {t!r} is not an edgeml/v1 device topic")
    if not DEVICE_ID_RE.match(parts[3]):
        raise MessageRejected(f"topic {t!r}: device id {parts[3]!r} is not valid")
    return parts[3], parts[4]


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id or ""):
        raise MessageRejected(
            f"device id {device_id!r} is not valid", hint="use 1-128 characters: letters, digits, '_', '.', '-'"
        )
    return device_id


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` -> dict (also used for selectors)."""
    from edgeml.errors import UsageError

    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not LABEL_RE.match(key) or not LABEL_RE.match(value):
            raise UsageError(f"label {part!r} is not KEY=VALUE", hint="e.g. --labels site=berlin,hw=rpi4")
        labels[key] = value
    return labels


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- schemas
# field -> (type or tuple of types, required)
_STR, _INT, _NUM, _BOOL, _DICT, _LIST = str, int, (int, float), bool, dict, list
_NULL = type(None)
SCHEMAS: dict[str, dict[str, tuple[Any, bool]]] = {
    "desired": {
        "device_id": (_STR, True), "deployment_id": (_STR, True), "seq": (_INT, True),
        "rollout_id": ((_STR, _NULL), False), "rollback": (_BOOL, True), "artifact": ((_DICT, _NULL), True),
        "issued_at": (_NUM, True), "health_window_s": (_NUM, False), "sig": (_DICT, False),
    },
    "presence": {
        "device_id": (_STR, True), "online": (_BOOL, True), "ts": (_NUM, True), "labels": (_DICT, False),
        "agent_version": (_STR, False), "active": ((_DICT, _NULL), False), "reason": (_STR, False),
        "endpoint": (_STR, False),
    },
    "heartbeat": {
        "device_id": (_STR, True), "ts": (_NUM, True), "labels": (_DICT, True), "state": (_STR, True),
        "active": ((_DICT, _NULL), True), "committed_seq": (_INT, True), "deployment_id": ((_STR, _NULL), False),
        "interval_s": (_NUM, False), "last_failed": ((_DICT, _NULL), False), "refused": (_INT, False),
    },
    "event": {
        "device_id": (_STR, True), "ts": (_NUM, True), "event_seq": (_INT, True), "deployment_id": (_STR, True),
        "deploy_seq": (_INT, True), "attempt": (_INT, True), "state": (_STR, True), "rollout_id": ((_STR, _NULL), False),
        "name": ((_STR, _NULL), False), "version": ((_STR, _NULL), False), "reason": ((_STR, _NULL), False),
        "active": ((_DICT, _NULL), False),
    },
    "telemetry": {
        "device_id": (_STR, True), "ts": (_NUM, True), "interval_s": (_NUM, True), "models": (_LIST, True),
        "active": ((_DICT, _NULL), True), "cpu_percent": (_NUM, False), "memory_mb": (_NUM, False),
        "throughput_rps": (_NUM, False), "stubbed": (_BOOL, False),
    },
}
TYPE_FOR_KIND = {"desired": "desired", "presence": "presence", "heartbeat": "heartbeat", "events": "event", "telemetry": "telemetry"}
_ARTIFACT_FIELDS = {"name": _STR, "version": _STR, "url": _STR, "sha256": _STR, "size": _INT}
_MODEL_FIELDS = {"name": _STR, "version": _STR, "requests": _INT, "failures": _INT, "latency_buckets_ms": _DICT,
                 "latency_sum_ms": _NUM}


def _typecheck(where: str, value: Any, want: Any) -> None:
    ok = isinstance(value, want) and not (isinstance(value, bool) and want in (_INT, _NUM))
    if isinstance(want, tuple) and isinstance(value, bool) and bool not in want:
        ok = False
    if not ok:
        raise MessageRejected(f"{where} has type {type(value).__name__}; expected {_tname(want)}")


def _tname(want: Any) -> str:
    if isinstance(want, tuple):
        return " or ".join(_tname(w) for w in want)
    return {type(None): "null"}.get(want, want.__name__)


def encode(message: Mapping[str, Any]) -> bytes:
    data = json.dumps(message, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def decode(payload: bytes, where: str = "message") -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"{where}: {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageRejected(f"{where}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise MessageRejected(f"{where}: must be a JSON object, got {type(obj).__name__}")
    return obj


def validate(t: str, payload: bytes) -> tuple[str, str, dict[str, Any]]:
    """Check a received message; returns (device_id, kind, message)."""
    device_id, kind = parse_topic(t)
    where = f"{kind} message on {t}"
    msg = decode(payload, where)
    validate_message(msg, TYPE_FOR_KIND[kind], where)
    if msg["device_id"] != device_id:
        raise MessageRejected(f"{where}: device_id {msg['device_id']!r} does not match the topic")
    return device_id, kind, msg


def validate_message(msg: Mapping[str, Any], mtype: str, where: str = "message") -> None:
    if msg.get("schema_version") != SCHEMA_VERSION:
        raise MessageRejected(f"{where}: schema_version {msg.get('schema_version')!r} is not {SCHEMA_VERSION}",
                              hint="upgrade edgeml on the sender or receiver so both speak the same version")
    if msg.get("type") != mtype:
        raise MessageRejected(f"{where}: type {msg.get('type')!r}; expected {mtype!r}")
    schema = SCHEMAS[mtype]
    for field, (want, required) in schema.items():
        if field not in msg:
            if required:
                raise MessageRejected(f"{where}: required field '{field}' is missing")
            continue
        _typecheck(f"{where}: field '{field}'", msg[field], want)
    unknown = set(msg) - set(schema) - {"schema_version", "type"}
    if unknown:
        raise MessageRejected(f"{where}: unknown fields {sorted(unknown)}")
    check_device_id(msg["device_id"])
    if mtype == "desired":
        if msg["seq"] < 0:
            raise MessageRejected(f"{where}: seq must be >= 0")
        art = msg["artifact"]
        if art is not None:
            for field, want in _ARTIFACT_FIELDS.items():
                if field not in art:
                    raise MessageRejected(f"{where}: artifact.{field} is missing")
                _typecheck(f"{where}: artifact.{field}", art[field], want)
            if not re.fullmatch(r"[0-9a-f]{64}", art["sha256"]):
                raise MessageRejected(f"{where}: artifact.sha256 is not 64 lowercase hex digits")
            if not art["url"].startswith(("http://", "https://")):
                raise MessageRejected(f"{where}: artifact.url must be http(s)")
    elif mtype == "event":
        if msg["state"] not in EVENT_STATES:
            raise MessageRejected(f"{where}: unknown state {msg['state']!r}")
    elif mtype == "telemetry":
        for i, model in enumerate(msg["models"]):
            if not isinstance(model, dict):
                raise MessageRejected(f"{where}: models[{i}] is not an object")
            for field, want in _MODEL_FIELDS.items():
                if field not in model:
                    raise MessageRejected(f"{where}: models[{i}].{field} is missing")
                _typecheck(f"{where}: models[{i}].{field}", model[field], want)


# ---------------------------------------------------------------- builders
def now() -> float:
    return time.time()


def desired(device_id: str, *, deployment_id: str, seq: int, artifact: Mapping[str, Any] | None,
            rollback: bool = False, rollout_id: str | None = None, health_window_s: float | None = None,
            issued_at: float | None = None) -> dict[str, Any]:
    msg = {"schema_version": SCHEMA_VERSION, "type": "desired", "device_id": device_id,
           "deployment_id": deployment_id, "seq": int(seq), "rollout_id": rollout_id, "rollback": bool(rollback),
           "artifact": dict(artifact) if artifact is not None else None,
           "issued_at": issued_at if issued_at is not None else now()}
    if health_window_s is not None:
        msg["health_window_s"] = float(health_window_s)
    return msg


def presence(device_id: str, online: bool, *, labels=None, active=None, reason: str | None = None,
             agent_version: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    msg = {"schema_version": SCHEMA_VERSION, "type": "presence", "device_id": device_id, "online": online, "ts": now()}
    if endpoint:
        msg["endpoint"] = endpoint
    if labels is not None:
        msg["labels"] = dict(labels)
    if active is not None or online:
        msg["active"] = active
    if reason:
        msg["reason"] = reason
    if agent_version:
        msg["agent_version"] = agent_version
    return msg


def _kind(mtype: str) -> str:
    return {v: k for k, v in TYPE_FOR_KIND.items()}[mtype]


# ---------------------------------------------------------------- signing
def signed_bytes(msg: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in msg.items() if k != "sig"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def sign(msg: dict[str, Any], private_key: Path) -> dict[str, Any]:
    from edgeml.runtime.signing import sign_bytes

    msg["sig"] = sign_bytes(signed_bytes(msg), private_key)
    return msg


def verify(msg: Mapping[str, Any], trusted_keys: list[Path], *, required: bool, where: str = "message") -> str | None:
    """Return the signer's key id, None when unsigned and not required; else MessageRejected."""
    from edgeml.runtime.signing import verify_bytes

    sig = msg.get("sig")
    if sig is None:
        if required:
            raise MessageRejected(f"{where}: unsigned, and this device requires messages signed by a trusted key")
        return None
    if not trusted_keys:
        if required:
            raise MessageRejected(f"{where}: signed, but no trusted key is configured to check it")
        return None
    try:
        return verify_bytes(signed_bytes(msg), dict(sig), list(trusted_keys))
    except (SignatureError, TypeError, ValueError) as exc:
        raise MessageRejected(f"{where}: bad signature ({getattr(exc, 'message', exc)})") from None


def log_rejection(logger, t: str, exc: Exception, counter: Callable[[], None] | None = None) -> None:
    logger.warning("refused message on %s: %s", t, getattr(exc, "message", exc))
    if counter:
        counter()
