"""MQTT transport: a thin wrapper over paho-mqtt 2.x.

* MQTT 5 first; falls back to 3.1.1 when the broker refuses v5 (amqtt answers
  reason code 132 "Unsupported protocol version") or drops a v5 CONNECT.
* Its own network loop thread reconnects with exponential backoff and full
  jitter, re-subscribes after every connect and flushes an outbox of QoS>=1
  messages published while offline (receivers are idempotent).
* TLS (CA, client cert/key) and username/password.
* Several brokers (a cluster's nodes): ``url`` may list them, comma-separated
  (``mqtt://n1:1883,mqtt://n2:1883``). A lost or refused connection moves to
  the next node at once; the backoff applies only after every node was tried.
* A subscription the broker refuses in its SUBACK (0x80) is retried after
  ``resubscribe_s``, doubling up to 10 s: a NATS MQTT gateway answers so while JetStream elects new
  leaders after a node is lost, and the client would otherwise never get its
  messages on a connection that looks healthy (docs/scale.md).

The agent and manager receive a ``Link`` (anything with ``publish``) so their
logic is tested without a broker; this class is the real one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from edgeml.errors import FleetError, UsageError

log = logging.getLogger("edgeml.fleet.transport")


@dataclass
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30
    protocol: str = "auto"           # auto | 5 | 3.1.1
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    outbox_limit: int = 10000
    connack_timeout_s: float = 2.0
    persistent_session: bool = False   # broker queues QoS 1 messages while this client is away
    session_expiry_s: int = 24 * 3600
    resubscribe_s: float = 1.0         # first retry of a subscription the broker refused (SUBACK failure)

    def endpoint(self) -> tuple[str, int, bool]:
        """The first broker (see ``endpoints`` for all)."""
        return self.endpoints()[0]

    def endpoints(self) -> list[tuple[str, int, bool]]:
        """(host, port, tls) of every broker in ``url`` (comma-separated: a cluster's nodes), in order."""
        urls = [u.strip() for u in self.url.split(",") if u.strip()]
        if not urls or len(urls) > 32:
            raise UsageError(f"broker URL {self.url!r} must name 1 to 32 brokers, comma-separated",
                             hint="e.g. --broker mqtt://n1:1883,mqtt://n2:1883")
        out = []
        for url in urls:
            u = urlparse(url)
            if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
                raise UsageError(f"broker URL {url!r} must start with mqtt:// or mqtts:// (tcp:// and ssl:// are"
                                 " accepted as their aliases)",
                                 hint="e.g. --broker mqtt://localhost:1883 (several: comma-separated)")
            tls = u.scheme in ("mqtts", "ssl") or self.tls_ca is not None
            try:
                port = u.port or (8883 if tls else 1883)
            except ValueError:
                raise UsageError(f"broker URL {url!r} has a bad port") from None
            out.append((u.hostname or "127.0.0.1", port, tls))
        return out


def read_password_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read password file {path}: {exc}") from None


class MqttTransport:
    def __init__(self, config: BrokerConfig, client_id: str, *,
                 will: tuple[str, bytes, int, bool] | None = None,
                 on_message: Callable[[str, bytes, bool], None] | None = None,
                 on_connect: Callable[[], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None):
        self.config = config
        self.client_id = client_id
        self.will = will
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self._endpoints = config.endpoints()
        self._node = 0
        self.host, self.port, self.tls = self._endpoints[0]
        self.protocol = {"auto": 5, "5": 5, "3.1.1": 4}.get(str(config.protocol))
        if self.protocol is None:
            raise UsageError(f"MQTT protocol {config.protocol!r} must be auto, 5 or 3.1.1")
        self._auto = str(config.protocol) == "auto"
        self._subs: dict[str, int] = {}
        self._sub_mids: dict[int, str] = {}       # SUBACK bookkeeping: message id -> topic
        self._sub_retry: dict[str, float] = {}    # refused topic -> when to subscribe again
        self._sub_refusals: dict[str, int] = {}   # refused topic -> refusals in a row (backoff, quiet logs)
        self.refused_subscriptions = 0
        self._outbox: OrderedDict[int, tuple[str, bytes, int, bool]] = OrderedDict()
        self._outbox_n = 0
        self._lock = threading.RLock()
        self._connected = threading.Event()
        self._failures = 0       # connection attempts failed in a row (logged at WARNING now and then)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._got_connack = False
        self.connects = 0
        self.last_error: str | None = None

    # ---------------------------------------------------------------- public
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol_name(self) -> str:
        return "5" if self.protocol == 5 else "3.1.1"

    def start(self) -> "MqttTransport":
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
            if self.connected and self._client is not None:
                self._subscribe_now(self._client, topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish now, or (QoS >= 1) queue until the next connect. True when handed to the socket."""
        with self._lock:
            if self.connected and self._client is not None:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
                if info.rc == 0:
                    return True
            if qos >= 1:
                self._queue(topic, payload, qos, retain)
            return False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._connected.clear()

    # ---------------------------------------------------------------- internals
    def _queue(self, topic, payload, qos, retain) -> None:
        if retain:  # a newer retained message on a topic replaces the queued one
            for key, (t, *_rest) in list(self._outbox.items()):
                if t == topic and _rest[2]:
                    del self._outbox[key]
        self._outbox_n += 1
        self._outbox[self._outbox_n] = (topic, payload, qos, retain)
        while len(self._outbox) > self.config.outbox_limit:
            self._outbox.popitem(last=False)

    def _new_client(self):
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if self.protocol == 5 else mqtt.MQTTv311,
                             reconnect_on_failure=False,
                             clean_session=(not self.config.persistent_session) if self.protocol != 5 else None)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self.tls:
            client.tls_set(ca_certs=str(self.config.tls_ca) if self.config.tls_ca else None,
                           certfile=str(self.config.tls_cert) if self.config.tls_cert else None,
                           keyfile=str(self.config.tls_key) if self.config.tls_key else None)
        if self.will:
            t, payload, qos, retain = self.will
            client.will_set(t, payload, qos=qos, retain=retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._got_connack = True
        code = getattr(reason_code, "value", reason_code)
        if reason_code.is_failure if hasattr(reason_code, "is_failure") else code != 0:
            self.last_error = f"broker refused the connection: {reason_code} ({code})"
            if self._auto and self.protocol == 5 and code in (1, 132):
                log.info("broker %s:%s does not speak MQTT 5 (%s); falling back to 3.1.1", self.host, self.port, reason_code)
                self.protocol = 4
            else:
                log.warning("%s", self.last_error)
            return
        with self._lock:
            self.connects += 1
            self._failures = 0
            self._connected.set()
            self._sub_mids.clear()
            self._sub_retry.clear()
            self._sub_refusals.clear()
            for t, qos in self._subs.items():
                self._subscribe_now(client, t, qos)
            pending, self._outbox = list(self._outbox.values()), OrderedDict()
            for t, payload, qos, retain in pending:
                client.publish(t, payload, qos=qos, retain=retain)
        log.info("connected to %s:%s (MQTT %s) as %s", self.host, self.port, self.protocol_name, self.client_id)
        if self.on_connect:
            try:
                self.on_connect()
            except Exception:  # noqa: BLE001 - never kill the network thread
                log.exception("on_connect callback failed")

    def _subscribe_now(self, client, topic: str, qos: int) -> None:
        _rc, mid = client.subscribe(topic, qos)
        if mid is not None:
            self._sub_mids[mid] = topic

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            topic = self._sub_mids.pop(mid, None)
            if topic is None:
                return
            if not any(getattr(rc, "is_failure", False) for rc in reason_codes):
                self._sub_refusals.pop(topic, None)
                return
            self.refused_subscriptions += 1
            n = self._sub_refusals[topic] = self._sub_refusals.get(topic, 0) + 1
            # doubling up to 10 s: prompt while a cluster recovers, quiet for a topic refused for good
            delay = min(self.config.resubscribe_s * 2 ** min(n - 1, 10), max(10.0, self.config.resubscribe_s))
            self._sub_retry[topic] = time.monotonic() + delay
        log.log(logging.WARNING if n == 1 or n % 30 == 0 else logging.DEBUG,
                "broker %s:%s refused the subscription to %s (%s, %d time(s)); retrying in %.1fs",
                self.host, self.port, topic, reason_codes[0], n, delay)

    def _retry_refused_subscriptions(self, client) -> None:
        now = time.monotonic()
        with self._lock:
            due = [t for t, at in self._sub_retry.items() if at <= now and t in self._subs]
            for topic in due:
                del self._sub_retry[topic]
                self._subscribe_now(client, topic, self._subs[topic])

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.info("disconnected from %s:%s: %s", self.host, self.port, reason_code)
            if self.on_disconnect:
                try:
                    self.on_disconnect(str(reason_code))
                except Exception:  # noqa: BLE001
                    log.exception("on_disconnect callback failed")

    def _handle_message(self, client, userdata, msg) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(msg.topic, msg.payload, bool(msg.retain))
        except Exception:  # noqa: BLE001 - a bad message must not kill the loop
            log.exception("message handler failed on %s", msg.topic)

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_min_s * (2 ** min(attempt, 16)))
        return random.uniform(self.config.backoff_min_s * 0.5, max(cap, self.config.backoff_min_s))

    def _run(self) -> None:
        import paho.mqtt.client as mqtt

        attempt = 0
        while not self._stop.is_set():
            self._got_connack = False
            proto_before = self.protocol
            try:
                with self._lock:
                    self._client = client = self._new_client()
                    # publishes from other threads then only queue + wake this loop (as with loop_start),
                    # so one thread ever writes the socket
                    client._thread = threading.current_thread()
                if self.protocol == 5 and self.config.persistent_session:
                    from paho.mqtt.packettypes import PacketTypes
                    from paho.mqtt.properties import Properties

                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self.config.session_expiry_s
                    client.connect(self.host, self.port, keepalive=self.config.keepalive,
                                         clean_start=False, properties=props)
                else:
                    client.connect(self.host, self.port, keepalive=self.config.keepalive)
            except (OSError, ValueError) as exc:
                self.last_error = f"cannot connect to {self.host}:{self.port}: {exc}"
                self._failures += 1     # WARNING on the first failure and every 10th: visible, never a flood
                log.log(logging.WARNING if self._failures % 10 == 1 else logging.DEBUG, "%s (attempt %d; retrying)",
                        self.last_error, self._failures)
                if self._next_node():     # every node tried: back off
                    self._sleep(self._backoff(attempt))
                    attempt += 1
                continue
            started = time.monotonic()
            buffered = _BufferedSocket.wrap(client)
            while not self._stop.is_set():
                rc = client.loop(timeout=0.2)
                while rc == mqtt.MQTT_ERR_SUCCESS and buffered is not None and buffered.pending():
                    rc = client.loop_read()      # the packets already read, without a select() each
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._sub_retry:
                    self._retry_refused_subscriptions(client)
                if not self._got_connack and time.monotonic() - started > self.config.connack_timeout_s:
                    self.last_error = f"no CONNACK from {self.host}:{self.port} within {self.config.connack_timeout_s}s"
                    break   # amqtt never answers a v5 CONNECT that carries a Will
                if self.protocol != proto_before:   # CONNACK said: v5 unsupported
                    break
            if self.protocol != proto_before or self._stop.is_set():
                try:   # a clean DISCONNECT: the broker then drops the Last Will
                    client.disconnect()
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline and client.loop(timeout=0.05) == mqtt.MQTT_ERR_SUCCESS:
                        pass
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
            self._handle_disconnect(self._client, None, None, "network loop ended", None)
            if self._stop.is_set():
                break
            if not self._got_connack and self._auto and self.protocol == 5:
                log.info("connection closed before CONNACK with MQTT 5; retrying with MQTT 3.1.1")
                self.protocol = 4
                continue
            if self.protocol != proto_before:
                continue
            if not self._next_node():     # another node of the cluster: try it at once
                self._sleep(0.05)
                continue
            self._sleep(self._backoff(attempt))
            attempt = 0 if self._got_connack and self.connects else attempt + 1

    def _next_node(self) -> bool:
        """Move to the next broker of the list; True when that wrapped around (or there is only one)."""
        self._node = (self._node + 1) % len(self._endpoints)
        self.host, self.port, self.tls = self._endpoints[self._node]
        if len(self._endpoints) > 1:
            log.info("trying broker %s:%s", self.host, self.port)
        return self._node == 0

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)


class _BufferedSocket:
    """paho reads each packet with three or more ``recv`` calls (1 byte, the length bytes, the body) and one
    ``select`` per packet: for the manager's connection, which receives the whole fleet's messages, those
    system calls were a third of the manager's CPU (profile in docs/scale.md). This wrapper reads up to 64 KiB
    at a time and serves paho's small reads from that buffer; ``pending()`` (which paho asks of TLS sockets
    too) tells its loop that bytes are waiting. Plain TCP only: TLS sockets are left as they are."""

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._pos = 0

    @classmethod
    def wrap(cls, client) -> "_BufferedSocket | None":
        import socket
        import ssl

        sock = getattr(client, "_sock", None)
        if type(sock) is not socket.socket or isinstance(sock, ssl.SSLSocket):
            return None
        client._sock = wrapped = cls(sock)
        return wrapped

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(n, 65536))     # BlockingIOError / OSError reach paho as before
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def connect_or_fail(transport: MqttTransport, timeout: float) -> None:
    transport.start()
    if not transport.wait_connected(timeout):
        transport.stop(1)
        raise FleetError(f"cannot reach the MQTT broker at {transport.host}:{transport.port} within {timeout:.0f}s"
                         f" ({transport.last_error or 'no answer'})", hint="check --broker, credentials and TLS files")
