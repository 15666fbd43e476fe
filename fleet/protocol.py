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

import base64
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import orjson

from edgeml.errors import MessageRejected, SignatureError
from edgeml.fleet.states import FailureCode, InstallState

SCHEMA_VERSION = 1
PREFIX = "edgeml/v1"
MAX_MESSAGE_BYTES = 64 * 1024
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
KINDS = ("desired", "presence", "heartbeat", "events", "telemetry")
# Fixed latency bucket upper bounds (ms): every agent uses the same edges, so the
# manager can add histograms from many devices (never average percentiles).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# install states reported in events (str Enums in fleet/states.py)
EVENT_STATES = tuple(s.value for s in InstallState if s is not InstallState.IDLE)
AGENT_STATES = tuple(s.value for s in InstallState)     # heartbeat.state
FAILURE_CODES = tuple(c.value for c in FailureCode)


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
MAX_DEPTH = 16                 # nesting of any received JSON (the deepest real message has 4)
MAX_INT = 2 ** 53              # counters, seqs, sizes: exact in a float, fits SQLite's INTEGER
MAX_MODELS = 64                # telemetry rows per message
SCHEMAS: dict[str, dict[str, tuple[Any, bool]]] = {
    "desired": {
        "device_id": (_STR, True), "deployment_id": (_STR, True), "seq": (_INT, True),
        "rollout_id": ((_STR, _NULL), False), "rollback": (_BOOL, True), "artifact": ((_DICT, _NULL), True),
        "issued_at": (_NUM, True), "health_window_s": (_NUM, False), "sig": (_DICT, False),
    },
    "presence": {
        "device_id": (_STR, True), "online": (_BOOL, True), "ts": (_NUM, True), "labels": (_DICT, False),
        "agent_version": (_STR, False), "active": ((_DICT, _NULL), False), "reason": (_STR, False),
        "endpoint": (_STR, False), "serving": (_BOOL, False),
    },
    "heartbeat": {
        "device_id": (_STR, True), "ts": (_NUM, True), "labels": (_DICT, True), "state": (_STR, True),
        "active": ((_DICT, _NULL), True), "committed_seq": (_INT, True), "deployment_id": ((_STR, _NULL), False),
        "interval_s": (_NUM, False), "last_failed": ((_DICT, _NULL), False), "refused": (_INT, False),
        "serving": (_BOOL, False),
    },
    "event": {
        "device_id": (_STR, True), "ts": (_NUM, True), "event_seq": (_INT, True), "deployment_id": (_STR, True),
        "deploy_seq": (_INT, True), "attempt": (_INT, True), "state": (_STR, True), "rollout_id": ((_STR, _NULL), False),
        "name": ((_STR, _NULL), False), "version": ((_STR, _NULL), False), "reason": ((_STR, _NULL), False),
        "active": ((_DICT, _NULL), False), "code": ((_STR, _NULL), False),
    },
    "telemetry": {
        "device_id": (_STR, True), "ts": (_NUM, True), "interval_s": (_NUM, True), "models": (_LIST, True),
        "active": ((_DICT, _NULL), True), "cpu_percent": (_NUM, False), "memory_mb": (_NUM, False),
        "throughput_rps": (_NUM, False), "stubbed": (_BOOL, False), "drift": (_LIST, False),
        "experiments": (_LIST, False),
    },
}
# numbers that can never be negative (besides every counter inside telemetry models)
_NON_NEGATIVE = {"seq", "deploy_seq", "event_seq", "attempt", "refused", "interval_s", "health_window_s",
                 "cpu_percent", "memory_mb", "throughput_rps"}
TYPE_FOR_KIND = {"desired": "desired", "presence": "presence", "heartbeat": "heartbeat", "events": "event", "telemetry": "telemetry"}
_ARTIFACT_FIELDS = {"name": _STR, "version": _STR, "url": _STR, "sha256": _STR, "size": _INT}
MODEL_FIELDS = {"name": _STR, "version": _STR, "requests": _INT, "failures": _INT, "latency_buckets_ms": _DICT,
                "latency_sum_ms": _NUM}
# the deployment record in presence / heartbeat / event / telemetry ``active``
_ACTIVE_FIELDS = {"name": (_STR, _NULL), "version": (_STR, _NULL), "seq": _INT, "deployment_id": (_STR, _NULL),
                  "sha256": (_STR, _NULL)}
_LAST_FAILED_FIELDS = {"deployment_id": _STR, "seq": _INT, "reason": (_STR, _NULL), "code": (_STR, _NULL)}


def bucket_keys() -> tuple[str, ...]:
    """The fixed histogram keys on the wire: ``"0.25"``, ..., ``"5000"``, ``"+Inf"``."""
    return tuple(str(int(e)) if float(e).is_integer() else str(e) for e in LATENCY_BUCKETS_MS) + ("+Inf",)


BUCKET_KEYS = bucket_keys()
_BUCKET_KEY_SET = frozenset(BUCKET_KEYS)


def _typecheck(where: str, value: Any, want: Any) -> None:
    ok = isinstance(value, want) and not (isinstance(value, bool) and want in (_INT, _NUM))
    if isinstance(want, tuple) and isinstance(value, bool) and bool not in want:
        ok = False
    if not ok:
        raise MessageRejected(f"{where} has type {type(value).__name__}; expected {_tname(want)}")
    _check_number(where, value)


def _passes(value: Any, want: Any, non_negative: bool = False) -> bool:
    """True when ``value`` passes ``_typecheck`` (and, ``non_negative``, ``_check_number(non_negative=True)``)
    -- decided without building the field's label, which is what the checks cost per message before (the
    manager validates every device message; profile in docs/scale.md). False: the caller runs the full check,
    which raises with the same words as ever."""
    if isinstance(value, bool):
        return want is _BOOL or (isinstance(want, tuple) and bool in want)
    if not isinstance(value, want):
        return False
    if isinstance(value, (int, float)):
        if value != value or not -MAX_INT <= value <= MAX_INT:     # NaN, +-inf, out of range
            return False
        if non_negative and value < 0:
            return False
    return True


def _check_number(where: str, value: Any, *, non_negative: bool = False) -> None:
    """Ints within +-MAX_INT, floats finite (json.loads already refuses NaN/Infinity here: belt and braces)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageRejected(f"{where} is {value}; expected a finite number")
    if abs(value) > MAX_INT:
        raise MessageRejected(f"{where} is {value}; the limit is {MAX_INT}")
    if non_negative and value < 0:
        raise MessageRejected(f"{where} is {value}; expected >= 0")


def _check_fields(where: str, obj: Any, fields: Mapping[str, Any], *, required: bool) -> None:
    if not isinstance(obj, dict):
        raise MessageRejected(f"{where} is not an object")
    for name, want in fields.items():
        if name not in obj:
            if required:
                raise MessageRejected(f"{where}.{name} is missing")
            continue
        if not _passes(obj[name], want):
            _typecheck(f"{where}.{name}", obj[name], want)
    unknown = obj.keys() - fields.keys()
    if unknown:
        raise MessageRejected(f"{where}: unknown fields {sorted(unknown)[:8]}")


def _tname(want: Any) -> str:
    if isinstance(want, tuple):
        return " or ".join(_tname(w) for w in want)
    return {type(None): "null"}.get(want, want.__name__)


def encode(message: Mapping[str, Any]) -> bytes:
    data = json.dumps(message, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET_RE = re.compile(rb"[\[\]{}]")


def json_depth(payload: bytes) -> int:
    """Deepest bracket nesting outside string literals: a linear scan, no recursion (json.loads recurses)."""
    depth = deepest = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub(b'""', payload)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_LONG_NUMBER_RE = re.compile(rb"[0-9]{19}")


def decode(payload: bytes, where: str = "message") -> dict[str, Any]:
    """Bounded JSON decode. The manager decodes every device message, so the common case is made cheap (profile
    in docs/scale.md): the depth scan runs only when the message holds more brackets than the depth limit (depth
    can never exceed the count), and orjson parses first. Anything orjson refuses, or that holds a 19+ digit run
    (orjson turns integers past 64 bits into floats, json keeps them exact), goes to the standard parser, so what
    is accepted and the words of every refusal are the same as before."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"{where}: {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    data = bytes(payload)
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        depth = json_depth(data)
        if depth > MAX_DEPTH:
            raise MessageRejected(f"{where}: JSON nested {depth} deep; the limit is {MAX_DEPTH}")
    obj: Any = None
    if not _LONG_NUMBER_RE.search(data):
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
    if obj is None:
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MessageRejected(f"{where}: not valid UTF-8 JSON ({str(exc)[:200]})") from None
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
        non_negative = field in _NON_NEGATIVE
        if not _passes(msg[field], want, non_negative):
            _typecheck(f"{where}: field '{field}'", msg[field], want)
            if non_negative:
                _check_number(f"{where}: field '{field}'", msg[field], non_negative=True)
    unknown = msg.keys() - schema.keys() - {"schema_version", "type"}
    if unknown:
        raise MessageRejected(f"{where}: unknown fields {sorted(unknown)[:8]}")
    check_device_id(msg["device_id"])
    _check_common(msg, where)
    if mtype == "desired":
        _check_desired(msg, where)
    elif mtype == "event":
        if msg["state"] not in EVENT_STATES:
            raise MessageRejected(f"{where}: unknown state {str(msg['state'])[:40]!r}")
    elif mtype == "heartbeat":
        if msg["state"] not in AGENT_STATES:
            raise MessageRejected(f"{where}: unknown state {str(msg['state'])[:40]!r}")
        if msg["committed_seq"] < -1:
            raise MessageRejected(f"{where}: committed_seq must be >= -1")
    elif mtype == "telemetry":
        _check_telemetry(msg, where)


def _check_common(msg: Mapping[str, Any], where: str) -> None:
    """Sub-objects every kind may carry: labels, active, last_failed, code."""
    labels = msg.get("labels")
    if labels is not None:
        if len(labels) > 64 or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 63 and len(v) <= 63
                                       for k, v in labels.items()):
            raise MessageRejected(f"{where}: labels must be at most 64 string pairs of <= 63 characters")
    if msg.get("active") is not None:
        _check_fields(f"{where}: active", msg["active"], _ACTIVE_FIELDS, required=False)
        if not _passes(seq := msg["active"].get("seq", 0), _NUM, non_negative=True):
            _check_number(f"{where}: active.seq", seq, non_negative=True)
    if msg.get("last_failed") is not None:
        _check_fields(f"{where}: last_failed", msg["last_failed"], _LAST_FAILED_FIELDS, required=False)
        _check_code(f"{where}: last_failed.code", msg["last_failed"].get("code"))
    _check_code(f"{where}: code", msg.get("code"))


def _check_code(where: str, code: Any) -> None:
    if code is not None and code not in FAILURE_CODES:
        raise MessageRejected(f"{where} {str(code)[:40]!r} is not one of {', '.join(FAILURE_CODES)}")


def _check_desired(msg: Mapping[str, Any], where: str) -> None:
    art = msg["artifact"]
    if art is None:
        return
    _check_fields(f"{where}: artifact", art, _ARTIFACT_FIELDS, required=True)
    if not re.fullmatch(r"[0-9a-f]{64}", art["sha256"]):
        raise MessageRejected(f"{where}: artifact.sha256 is not 64 lowercase hex digits")
    if not art["url"].startswith(("http://", "https://")):
        raise MessageRejected(f"{where}: artifact.url must be http(s)")
    _check_number(f"{where}: artifact.size", art["size"], non_negative=True)


def _check_telemetry(msg: Mapping[str, Any], where: str) -> None:
    _check_drift(msg.get("drift", []), where)
    _check_experiments(msg.get("experiments", []), where)
    models = msg["models"]
    if len(models) > MAX_MODELS:
        raise MessageRejected(f"{where}: {len(models)} models; the limit is {MAX_MODELS}")
    for i, model in enumerate(models):
        at = f"{where}: models[{i}]"
        if isinstance(model, dict) and "resilience" in model:   # optional: breaker/admission/fallback state
            _check_resilience(at, model["resilience"])
            model = {k: v for k, v in model.items() if k != "resilience"}
        _check_fields(at, model, MODEL_FIELDS, required=True)
        for name in ("requests", "failures", "latency_sum_ms"):
            if not _passes(model[name], _NUM, non_negative=True):
                _check_number(f"{at}.{name}", model[name], non_negative=True)
        if model["failures"] > model["requests"]:
            raise MessageRejected(f"{at}: failures {model['failures']} > requests {model['requests']}")
        buckets = model["latency_buckets_ms"]
        unknown = buckets.keys() - _BUCKET_KEY_SET
        if unknown:
            raise MessageRejected(f"{at}.latency_buckets_ms: keys {sorted(unknown)[:4]} are not the fixed bucket"
                                  f" edges {', '.join(BUCKET_KEYS)}")
        for key, count in buckets.items():
            if isinstance(count, bool) or not isinstance(count, int):
                raise MessageRejected(f"{at}.latency_buckets_ms[{key!r}] has type {type(count).__name__};"
                                      " expected int")
            if not 0 <= count <= MAX_INT:
                _check_number(f"{at}.latency_buckets_ms[{key!r}]", count, non_negative=True)


def _check_resilience(at: str, row: Any) -> None:
    """A model row's ``resilience`` object (fleet/resilience.py): exact fields, enum state, bounded values."""
    from edgeml.fleet.resilience import wire_problem

    problem = wire_problem(row)
    if problem is not None:
        raise MessageRejected(f"{at}.resilience {problem}")


def _check_drift(rows: list[Any], where: str) -> None:
    """Drift sketches (edgeml.runtime.drift.wire): bounded rows, exact fields, counts that add up."""
    from edgeml.runtime.drift import wire_problem

    if len(rows) > MAX_MODELS:
        raise MessageRejected(f"{where}: {len(rows)} drift rows; the limit is {MAX_MODELS}")
    for i, row in enumerate(rows):
        problem = wire_problem(row)
        if problem is not None:
            raise MessageRejected(f"{where}: drift[{i}] {problem}")


def _check_experiments(rows: list[Any], where: str) -> None:
    """Experiment counters (edgeml.fleet.experiments.wire_problem): at most a few rows, exact fields."""
    from edgeml.fleet.experiments import wire_problem

    if len(rows) > 4:
        raise MessageRejected(f"{where}: {len(rows)} experiment rows; the limit is 4")
    for i, row in enumerate(rows):
        problem = wire_problem(row)
        if problem is not None:
            raise MessageRejected(f"{where}: experiments[{i}] {problem}")


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
             agent_version: str | None = None, endpoint: str | None = None,
             serving: bool | None = None) -> dict[str, Any]:
    msg = {"schema_version": SCHEMA_VERSION, "type": "presence", "device_id": device_id, "online": online, "ts": now()}
    if serving is not None:
        msg["serving"] = serving
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


# ---------------------------------------------------------------- signing
def signed_bytes(msg: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in msg.items() if k != "sig"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


_SIGNING_KEYS: dict[tuple[str, int, int, int], tuple[Any, str]] = {}


def _signing_key(path: Path) -> tuple[Any, str] | None:
    """(private key, key id) of ``path``, parsed once per file version (path, inode, size, mtime): the manager
    signs one desired message per device per wave, and re-reading + parsing the PEM file each time was a tenth
    of a wave start. None when the file cannot be stat'ed (the caller's load reports it)."""
    from edgeml.runtime.signing import key_id_of, load_private_key

    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    found = _SIGNING_KEYS.get(ident)
    if found is None:
        key = load_private_key(path)
        found = (key, key_id_of(key.public_key()))
        if len(_SIGNING_KEYS) >= 8:
            _SIGNING_KEYS.clear()
        _SIGNING_KEYS[ident] = found
    return found


def sign(msg: dict[str, Any], private_key: Path) -> dict[str, Any]:
    from edgeml.runtime.signing import sign_bytes

    cached = _signing_key(Path(private_key))
    if cached is None:
        msg["sig"] = sign_bytes(signed_bytes(msg), private_key)     # raises the SignatureError naming the file
        return msg
    key, key_id = cached
    msg["sig"] = {"algorithm": "ed25519", "key_id": key_id,        # the dict sign_bytes writes
                  "signature": base64.b64encode(key.sign(signed_bytes(msg))).decode("ascii")}
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
