"""Long-running manager process: Manager + MQTT + artifact HTTP server + tick loop.

The CLI reaches a running manager through the ``commands`` table of the same
SQLite file (``CommandClient``): it inserts a row, the manager's tick executes
it within ``tick_s`` and writes the result or error back. Reads (devices,
status, telemetry) go to the database directly, so they work with or without a
manager running.
"""

from __future__ import annotations

import getpass
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from edgeml.errors import FleetError
from edgeml.fleet import protocol as P
from edgeml.fleet.db import FleetDB
from edgeml.fleet.manager import Manager, ManagerConfig
from edgeml.fleet.store import StoreServer
from edgeml.fleet.transport import BrokerConfig, MqttTransport

log = logging.getLogger("edgeml.fleet.service")


class ManagerService:
    def __init__(self, config: ManagerConfig, broker: BrokerConfig, *, clock=time.time):
        self.config = config
        self.broker = broker
        self.clock = clock
        self.manager: Manager | None = None
        self.server: StoreServer | None = None
        self.transport: MqttTransport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ManagerService":
        from edgeml.fleet.store import ArtifactStore

        store = ArtifactStore(self.config.store_path())
        self.server = StoreServer(store, self.config.http_host, self.config.http_port, self.config.public_url).start()
        self.manager = Manager(self.config, None, clock=self.clock, artifact_base_url=self.server.base_url)
        broker = self.broker
        broker.persistent_session = True   # the broker keeps QoS 1 events for us while we restart
        # one stable client id per database: a restarted manager resumes its broker session (queued events),
        # and two managers of different fleets on one broker do not kick each other off
        import hashlib

        from edgeml.fleet.leader import Leadership, replica_name

        replicas = self.manager.db.postgres       # PostgreSQL: any number of replicas, one leader (fleet/leader.py)
        self.leadership = Leadership(str(self.config.db) if replicas else None)
        db_id = self.config.db if replicas else Path(self.config.db).resolve()
        client_id = "edgeml-manager-" + hashlib.sha256(str(db_id).encode()).hexdigest()[:10]
        if replicas:
            # each replica its own CLEAN session: a dead replica's membership in the shared subscription ends with
            # its connection (a persistent one would keep taking its share of messages into a queue no one reads;
            # heartbeats reconcile anything missed while every replica was down)
            broker.persistent_session = False
        if replicas:     # each replica its own session; the shared subscription spreads the devices' messages
            client_id += "-" + hashlib.sha256(replica_name().encode()).hexdigest()[:8]
        from edgeml.fleet.ingest import IngestQueue

        self.ingest = IngestQueue(self.manager.on_messages).start()    # batched: one commit per burst
        self.transport = MqttTransport(broker, client_id, on_message=self.ingest.put,
                                       on_connect=self.manager.on_connect)
        self.manager.link = self.transport
        for kind in ("presence", "heartbeat", "events", "telemetry"):
            # MQTT 5 shared subscription: the broker hands each message to ONE replica of group "edgeml".
            # (Mosquitto 2 also honours $share for 3.1.1 clients; on a broker without it, run without
            # --shared-subscriptions and every replica ingests everything: writes are idempotent.)
            topic = P.wildcard(kind)
            self.transport.subscribe(f"$share/edgeml/{topic}" if replicas else topic, 1)
        self.transport.start()
        self._thread = threading.Thread(target=self._loop, name="fleet-manager", daemon=True)
        self._thread.start()
        log.info("manager: db %s, artifacts at %s, broker %s", self.config.db, self.server.base_url, broker.url)
        if not self.config.sign_key:
            log.warning("no --sign-key: desired-state messages go out unsigned, and agents started with"
                        " --trusted-key (without --allow-unsigned) will refuse them")
        return self

    def _loop(self) -> None:
        manager = self.manager
        assert manager is not None, "start() creates the manager before the loop"
        leading = False
        while not self._stop.is_set():
            try:
                if self.leadership.is_leader():
                    if not leading:
                        leading = True
                        manager.took_leadership(self.leadership.name)
                    manager.tick()
                elif leading:
                    leading = False
                    log.warning("replica %s is no longer the leader", self.leadership.name)
            except Exception:  # noqa: BLE001 - the loop must survive one bad round
                log.exception("manager tick failed")
            self._stop.wait(self.config.tick_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if getattr(self, "leadership", None) is not None:
            self.leadership.close()
        if self.transport:
            self.transport.stop()
        if getattr(self, "ingest", None) is not None:
            self.ingest.stop()
        if self.server:
            self.server.stop()
        if self.manager:
            self.manager.db.close()


class CommandClient:
    """Queue a command for the running manager and wait for its answer."""

    def __init__(self, db_path: Path, actor: str | None = None):
        self.db = FleetDB(db_path, readonly=True)
        self.actor = actor or default_actor()

    def submit(self, command: str, args: dict[str, Any], wait_s: float = 15.0) -> dict[str, Any]:
        cid = self.db.x("INSERT INTO commands (ts, actor, command, args) VALUES (?,?,?,?)",
                        (time.time(), self.actor, command, json.dumps(args))).lastrowid
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            row = self.db.one("SELECT status, result, error FROM commands WHERE id = ?", (cid,))
            if row["status"] == "done":
                return json.loads(row["result"])
            if row["status"] == "error":
                err = json.loads(row["error"])
                raise FleetError(err["message"], hint=err.get("hint"))
            time.sleep(0.1)
        self.db.x("UPDATE commands SET status = 'expired' WHERE id = ? AND status = 'pending'", (cid,))
        raise FleetError(f"no manager answered within {wait_s:.0f}s (command withdrawn)",
                         hint="start one: edgeml fleet manager --broker ... --db " + self.db.location)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"
