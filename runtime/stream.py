"""``edgeml run ART --mqtt-in TOPIC --mqtt-out TOPIC --broker URL``: the sensor pattern.

Each message on ``--mqtt-in`` is a v2 inference request body (the JSON of ``POST
/v2/models/{m}/infer``), decoded and validated by the server's own parser
(``protocol.parse_infer_request``: names, datatypes, shapes, value counts, strict values,
the row limit), run, and answered on ``--mqtt-out`` with the v2 response JSON, or with
``{"error": "...", "status": 400|500}`` naming the field at fault. Counters and latency
histograms are the server's ``ModelStats``. Memory is bounded: a message over
``max_message_bytes`` is refused unread, and at most ``QUEUE_MESSAGES`` wait (the MQTT
network thread blocks past that, so the broker holds the rest).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from edgeml.errors import DataError, UsageError

QUEUE_MESSAGES = 64
MAX_MESSAGE_BYTES = 16 << 20


@dataclass(frozen=True)
class StreamConfig:
    broker: str                       # mqtt://host:port (mqtts:// for TLS)
    topic_in: str
    topic_out: str
    max_messages: int | None = None   # stop after this many (None: until stopped)
    idle_timeout_s: float | None = None   # stop after this long without a message
    max_rows: int = 32                # rows per message (as serve's --max-request-rows)
    max_message_bytes: int = MAX_MESSAGE_BYTES
    qos: int = 1

    def check(self) -> tuple[str, int, bool]:
        """(host, port, tls) or a UsageError naming the option at fault."""
        u = urlsplit(self.broker)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise UsageError(f"--broker {self.broker!r} must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        try:
            port = u.port or (8883 if u.scheme == "mqtts" else 1883)
        except ValueError:
            raise UsageError(f"--broker {self.broker!r} has an invalid port") from None
        for opt, topic in (("--mqtt-in", self.topic_in), ("--mqtt-out", self.topic_out)):
            if not topic or len(topic.encode()) > 65535 or "\0" in topic:
                raise UsageError(f"{opt} {topic!r} is not a valid MQTT topic")
        if "+" in self.topic_out or "#" in self.topic_out:
            raise UsageError(f"--mqtt-out {self.topic_out!r} must not hold the wildcards + or #")
        return u.hostname, port, u.scheme == "mqtts"


def run_stream(model: Any, cfg: StreamConfig, stop: threading.Event,
               on_message: Callable[[int, int], None] | None = None,
               on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Consume, infer, publish until ``stop``, ``max_messages`` or ``idle_timeout_s``; return the stats."""
    import paho.mqtt.client as mqtt

    from edgeml.runtime.server.repository import LoadedModel

    host, port, tls = cfg.check()
    lm = LoadedModel(model, model.name, model.version, None)
    inbox: queue.Queue[bytes] = queue.Queue(maxsize=QUEUE_MESSAGES)
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeml-run-{id(lm):x}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(cfg.topic_in, cfg.qos)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, msg: inbox.put(bytes(msg.payload))
    if tls:
        client.tls_set()
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise UsageError(f"--broker {cfg.broker}: cannot connect: {exc.strerror or exc}",
                         hint="check the broker address and that it is running") from None
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise UsageError(f"--broker {cfg.broker}: no subscription to {cfg.topic_in!r} within 10 s")
        if on_ready is not None:
            on_ready()
        return _consume(lm, cfg, client, inbox, stop, on_message)
    finally:
        client.loop_stop()
        client.disconnect()


def _consume(lm: Any, cfg: StreamConfig, client: Any, inbox: "queue.Queue[bytes]", stop: threading.Event,
             on_message: Callable[[int, int], None] | None) -> dict[str, Any]:
    handled, last = 0, time.monotonic()
    pending = None
    while not stop.is_set() and (cfg.max_messages is None or handled < cfg.max_messages):
        try:
            payload = inbox.get(timeout=0.1)
        except queue.Empty:
            if cfg.idle_timeout_s is not None and time.monotonic() - last > cfg.idle_timeout_s:
                break
            continue
        last = time.monotonic()
        status, body = answer(lm, payload, cfg)
        pending = client.publish(cfg.topic_out, body, qos=cfg.qos)
        handled += 1
        if on_message is not None:
            on_message(handled, status)
    if pending is not None:
        pending.wait_for_publish(5)
    return {"messages": handled, **lm.stats.to_dict()}


def answer(lm: Any, payload: bytes, cfg: StreamConfig) -> tuple[int, bytes]:
    """(status, response body) for one message: the v2 response, or an error naming the field."""
    from edgeml.runtime.server.protocol import RequestError, encode_infer_response, parse_infer_request

    t0 = time.perf_counter()
    req_id = None
    try:
        if len(payload) > cfg.max_message_bytes:
            raise RequestError(f"message of {len(payload)} bytes is over the limit of {cfg.max_message_bytes}", 413)
        req = parse_infer_request(payload, None, lm, cfg.max_rows if lm.batchable else None)
        req_id = req.id
        req.binary, req.binary_default = {}, False        # MQTT answers are JSON only
        outputs = lm.model.predict(req.feeds)
        body, _ = encode_infer_response(lm.name, lm.version, req.id, outputs, req, lm.output_order)
        status = 200
    except RequestError as exc:
        status, body = exc.status, _error(exc.message, exc.status, req_id or _id_of(payload))
    except DataError as exc:
        status, body = 400, _error(exc.message, 400, req_id)
    except Exception as exc:  # noqa: BLE001 - the backend failed on this message only
        status, body = 500, _error(f"model {lm.name!r} failed: {type(exc).__name__}: {exc}", 500, req_id)
    lm.stats.record(status, (time.perf_counter() - t0) * 1000.0)
    return status, body


def _error(message: str, status: int, req_id: str | None) -> bytes:
    doc: dict[str, Any] = {"error": message, "status": status}
    if req_id is not None:
        doc["id"] = req_id
    return json.dumps(doc).encode()


def _id_of(payload: bytes) -> str | None:
    """The request's ``id`` for an error reply when the body is JSON but otherwise refused (best effort)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None
