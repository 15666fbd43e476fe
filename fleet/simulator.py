"""Fleet simulator: many agents in one process, same protocol code, real broker.

Each simulated device is a full ``AgentCore`` (journal, slots, replay
protection, real HTTP download, sha256 + Ed25519 verification, target check,
events, heartbeats, telemetry). What differs from a real agent:

* the model run is STUBBED (``StubServing``): the self-test passes or fails by
  the device's ``fail_selftest`` flag, and probes report a fixed latency;
  telemetry messages carry ``stubbed: true``;
* devices share MQTT connections, ``devices_per_connection`` (500) each, and
  each connection subscribes to its own devices' ``desired`` topics, so there
  is no per-device Last Will: presence is a retained birth per device and
  liveness comes from heartbeats. Why not one connection for all: a broker
  bounds the QoS 1 messages it queues per client (Mosquitto
  ``max_queued_messages``, 1,000 by default) and DROPS the rest -- a 100 %
  wave of thousands of desired messages to one connection lost most of them,
  and the rollout waited forever (the 3,000+ device stall). Real agents have
  one connection each;
* the artifact is fetched over HTTP ONCE per simulator process and hard-linked
  into each device's slot (``SharedDownloader``, like a site cache); the first
  device to install that file verifies it fully (members, hashes, signature,
  target), the others reuse that verdict for the same inode (``SimAgentCore``);
  the desired message's signature is still checked by every device;
* the journal is the same records at the same steps, written without fsync
  (``SimJournal``: the state lives in tmpfs);
* ``run_simulation`` (``edgeml fleet simulate``, ``benchmarks/fleet_scale.py``)
  runs the devices in child processes (fleet/simulator_procs.py), so the
  manager keeps its own interpreter and core, and prints the CPU each side used;
* heartbeat and telemetry intervals grow with the fleet (``scaled_intervals``:
  at most ~500 heartbeats/s and ~200 telemetry messages/s in all), as a real
  fleet of thousands would be configured; ``benchmarks/fleet_scale.py``
  measures the manager's ingest rate separately, at full speed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeml.fleet import protocol as P
from edgeml.fleet.agent import AgentConfig, AgentCore
from edgeml.fleet.serving import StubServing
from edgeml.fleet.slots import Journal
from edgeml.fleet.store import download
from edgeml.fleet.transport import BrokerConfig, MqttTransport

log = logging.getLogger("edgeml.fleet.simulator")


@dataclass
class SimConfig:
    devices: int = 100
    prefix: str = "sim"
    labels: dict[str, str] = field(default_factory=lambda: {"fleet": "sim"})
    failing: set[str] = field(default_factory=set)       # device ids whose self-test fails...
    failing_versions: set[str] | None = None             # ...for these versions (None: all)
    state_root: Path | None = None                       # default: a temp dir (in /dev/shm when there is one)
    trusted_keys: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    heartbeat_s: float = 2.0
    telemetry_s: float = 5.0
    health_window_s: float = 0.0
    workers: int = 16
    devices_per_connection: int = 500     # below the broker's per-client queue bound (see the module doc)
    first: int = 0                        # number of the first device (a shard of fleet/simulator_procs.py)

    def device_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:04d}" for i in range(self.first, self.first + self.devices)]


def scaled_intervals(devices: int) -> tuple[float, float]:
    """(heartbeat_s, telemetry_s) for a simulated fleet: 2 s / 5 s up to 1,000 devices, then slower so the
    whole fleet sends about 500 heartbeats/s and 200 telemetry messages/s."""
    return max(2.0, devices / 500), max(5.0, devices / 200)


class SharedDownloader:
    """``AgentCore.downloader`` for simulated devices: one real, verified HTTP download per artifact, then a
    hard link (a copy across file systems) into each device's slot path."""

    def __init__(self, cache: Path):
        self.cache = cache
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.downloads = 0

    def __call__(self, url: str, dest: Path, *, sha256: str, size: int, **kw) -> Path:
        with self._guard:
            lock = self._locks.setdefault(sha256, threading.Lock())
        cached = self.cache / f"{sha256}.edgepkg"
        with lock:
            if not cached.exists():
                download(url, cached, sha256=sha256, size=size, **kw)
                self.downloads += 1
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(cached, tmp)
        except OSError:
            import shutil

            shutil.copyfile(cached, tmp)
        os.replace(tmp, dest)
        return dest


class SimJournal(Journal):
    """A simulated device's journal: the same records at the same steps, written as compact JSON (orjson)
    and renamed into place without fsync -- the simulated state lives in tmpfs (/dev/shm) and dies with the run.
    Why: the pretty-printed, fsynced journal was a third of the simulator's CPU (8 writes per install; profile
    in docs/scale.md). The real agent keeps ``Journal`` (temp + fsync + rename + fsync of the folder)."""

    def save(self) -> None:
        tmp = self.path.with_name(f".journal.{threading.get_ident()}.tmp")
        tmp.write_bytes(orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS))
        os.replace(tmp, self.path)


class SimAgentCore(AgentCore):
    """A simulated device: ``AgentCore`` with one shortcut. Every device of a simulator process installs a hard
    link of the same downloaded file (``SharedDownloader``), so a file already verified for the same artifact
    (same inode, size and mtime; same expected sha256, name and version) is not verified again: the first
    device runs the full check (zip members, hashes, signature, target), the others reuse its verdict. A
    verification that fails is never remembered. Why: re-verifying identical bytes 10,000 times was a fifth of
    the simulator's CPU, which shares the box with the manager it is there to load (docs/scale.md)."""

    verified: set[tuple[Any, ...]]      # shared by the process's devices (FleetSimulator sets it)

    def _verify(self, path: Path, art: dict[str, Any]) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return super()._verify(path, art)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, art["sha256"], art["name"], art["version"])
        if key in self.verified:
            return None
        super()._verify(path, art)
        self.verified.add(key)
        return None


class FleetSimulator:
    def __init__(self, config: SimConfig, broker: BrokerConfig):
        self.config = config
        root = config.state_root
        if root is None:
            base = "/dev/shm" if Path("/dev/shm").is_dir() else None
            root = Path(tempfile.mkdtemp(prefix="edgeml-sim-", dir=base))
        self.root = Path(root)
        self.cores: dict[str, AgentCore] = {}
        self._verified: set[tuple[Any, ...]] = set()
        self.downloader = SharedDownloader(self.root / "_shared-downloads")
        self.transports: list[MqttTransport] = []
        ids = config.device_ids()
        per = max(1, config.devices_per_connection)
        for k in range(0, len(ids), per):
            shard = ids[k:k + per]
            transport = MqttTransport(broker, f"edgeml-sim-{config.prefix}-{config.first + k}", on_message=self._on_message,
                                      on_connect=lambda shard=shard: self._on_connect(shard))
            self.transports.append(transport)
            for dev in shard:
                self.cores[dev] = self._core(dev, transport)
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="sim-install")
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def _core(self, dev: str, transport: MqttTransport) -> AgentCore:
        c = self.config
        ac = AgentConfig(dev, self.root / dev, labels=dict(c.labels), trusted_keys=c.trusted_keys,
                         allow_unsigned=c.allow_unsigned, heartbeat_s=c.heartbeat_s, telemetry_s=c.telemetry_s,
                         health_window_s=c.health_window_s, health_probe_s=0.05, check_host=True)
        serving = StubServing(fail_selftest=dev in c.failing, fail_versions=c.failing_versions)
        core = SimAgentCore(ac, transport, serving, downloader=self.downloader)
        core.verified = self._verified
        core.journal = SimJournal(core.state_dir)
        return core

    def start(self, timeout: float = 10.0) -> "FleetSimulator":
        for core in self.cores.values():
            core.restore()
        for dev, core in self.cores.items():
            cast_transport(core).subscribe(P.topic(dev, "desired"), 1)
        for transport in self.transports:
            transport.start()
        deadline = time.monotonic() + timeout
        for transport in self.transports:
            if not transport.wait_connected(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"simulator could not connect: {transport.last_error}")
        self._ticker = threading.Thread(target=self._tick_loop, name="sim-ticker", daemon=True)
        self._ticker.start()
        for dev in self.cores:
            self._kick(dev)
        return self

    def stop(self) -> None:
        self._stop.set()
        for core in self.cores.values():
            core._stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._ticker:
            self._ticker.join(5)
        for transport in self.transports:
            transport.stop()

    # ------------------------------------------------------------ internals
    def _on_connect(self, shard: list[str]) -> None:
        for dev in shard:
            self.cores[dev].publish_presence(True)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            device_id, _ = P.parse_topic(topic)
        except Exception:  # noqa: BLE001 - the core logs refusals; here we only route
            return
        core = self.cores.get(device_id)
        if core is None:
            return
        core.on_message(topic, payload, retained)
        self._kick(device_id)

    def _kick(self, device_id: str) -> None:
        core = self.cores[device_id]
        with self._lock:
            if device_id in self._busy or core._wanted is None or self._stop.is_set():
                return
            self._busy.add(device_id)
        self.pool.submit(self._run, device_id)

    def _run(self, device_id: str) -> None:
        core = self.cores[device_id]
        try:
            while core.step_pending():
                pass
        except Exception:  # noqa: BLE001
            log.exception("simulated device %s crashed an install", device_id)
        finally:
            with self._lock:
                self._busy.discard(device_id)
            if core._wanted is not None:
                self._kick(device_id)

    def _tick_loop(self) -> None:
        cores = list(self.cores.values())
        n = max(1, len(cores))
        next_tel = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            do_tel = start >= next_tel
            if do_tel:
                next_tel = start + self.config.telemetry_s
            # spread one heartbeat per device over the heartbeat interval
            for i, core in enumerate(cores):
                if self._stop.is_set():
                    return
                core.publish_heartbeat()
                if do_tel:
                    core.publish_telemetry()
                if i % 50 == 49:
                    self._stop.wait(self.config.heartbeat_s * 50 / n * 0.8)
            self._stop.wait(max(0.0, self.config.heartbeat_s - (time.monotonic() - start)))

    # ------------------------------------------------------------ reading the fleet
    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for core in self.cores.values():
            a = core.active()
            key = f"{a['name']}@{a['version']}" if a else "(none)"
            out[key] = out.get(key, 0) + 1
        return out


def cast_transport(core: AgentCore) -> MqttTransport:
    """The connection a simulated device's core publishes on (its shard's)."""
    link = core.link
    assert isinstance(link, MqttTransport)
    return link


MANAGER_THREADS = ("fleet-manager", "fleet-ingest", "mqtt-edgeml-manager", "artifact-store")
SIMULATOR_THREADS = ("sim-", "mqtt-edgeml-sim-")


def manager_cpu_s(prefixes: tuple[str, ...] = MANAGER_THREADS) -> float:
    """CPU seconds used so far by this process's threads named ``prefixes*`` -- by default the manager's (tick
    loop, ingest writer, its MQTT network thread, artifact server): "manager time" (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for t in threading.enumerate():
        if t.native_id is None or not t.name.startswith(prefixes):
            continue
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick    # utime + stime
    return total


def run_simulation(*, devices: int = 500, fail_fraction: float = 0.2, waves: list[float] | None = None,
                   bake_s: float = 0.5, max_failure_rate: float = 0.1, workdir: Path | None = None,
                   echo=print, seed: int = 7, db: str | None = None, processes: int | None = None) -> dict:
    """Broker + manager + ``devices`` simulated agents: roll out v1 (all good), then v2 that fails the
    self-test on ``fail_fraction`` of the devices. Returns the two outcomes, their wall time and where the CPU
    went (manager threads, simulator, broker). ``edgeml fleet simulate`` and ``benchmarks/fleet_scale.py`` both
    run this. ``processes``: simulator child processes (None: every core but one, at most 4; 0: in this
    process, sharing the manager's interpreter lock as before). SIGTERM/SIGINT stop the broker, the manager and
    every simulator child before ``Terminated`` propagates (fleet/simulator_procs.py)."""
    from edgeml.fleet.simulator_procs import stop_on_signals

    with stop_on_signals():
        return _run_simulation(devices=devices, fail_fraction=fail_fraction, waves=waves, bake_s=bake_s,
                               max_failure_rate=max_failure_rate, workdir=workdir, echo=echo, seed=seed, db=db,
                               processes=processes)


def _run_simulation(*, devices: int, fail_fraction: float, waves: list[float] | None, bake_s: float,
                    max_failure_rate: float, workdir: Path | None, echo, seed: int, db: str | None,
                    processes: int | None) -> dict:
    import random

    from edgeml.fleet.broker import Broker, free_port
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.simulator_procs import SimulatorProcesses, cleaning_up, default_processes, proc_cpu_s
    from edgeml.fleet.testing import make_artifact, wait_until
    from edgeml.runtime.signing import generate_keypair

    waves = waves or [0.05, 0.25, 1.0]
    processes = default_processes() if processes is None else processes
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgeml-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    key, pub = generate_keypair(work / "signing.key", overwrite=True)
    arts = [make_artifact(work / f"tiny-{v}.edgepkg", "tiny", v, sign_key=key) for v in ("1.0.0", "2.0.0")]
    broker = svc = sim = None
    heartbeat_s, telemetry_s = scaled_intervals(devices)
    ids = [f"sim-{i:04d}" for i in range(devices)]
    failing = set(random.Random(seed).sample(ids, int(round(devices * fail_fraction))))
    out: dict = {"heartbeat_s": heartbeat_s, "telemetry_s": telemetry_s, "devices": devices, "failing": len(failing),
                 "simulator_processes": processes, "cpus": os.cpu_count(), "rollouts": []}
    try:
        broker = Broker(work / "broker", persistence=False).start()
        out["broker"] = broker.kind
        svc = ManagerService(ManagerConfig(db=db or work / "fleet.db", store_dir=work / "store", http_port=free_port(),
                                           tick_s=0.2, sign_key=key, health_window_s=0.0,
                                           heartbeat_timeout_s=max(30.0, 3 * heartbeat_s)),
                             BrokerConfig(broker.url)).start()
        m = svc.manager
        for a in arts:
            m.publish_artifact(a, "simulator")
        config = SimConfig(devices=devices, failing=failing, failing_versions={"2.0.0"}, trusted_keys=[pub],
                           heartbeat_s=heartbeat_s, telemetry_s=telemetry_s)
        if processes:
            sim = SimulatorProcesses(config, broker.url, processes=processes, workdir=work / "simulator").start()
        else:
            sim = FleetSimulator(config, BrokerConfig(broker.url)).start()
        broker_pid = broker.proc.pid if broker.proc else None

        def cpu() -> dict[str, float]:
            sim_cpu = sim.cpu_s() if isinstance(sim, SimulatorProcesses) else manager_cpu_s(SIMULATOR_THREADS)
            return {"manager_cpu_s": manager_cpu_s(), "simulator_cpu_s": sim_cpu, "broker_cpu_s": proc_cpu_s(broker_pid),
                    "main_thread_cpu_s": time.thread_time() if threading.current_thread() is threading.main_thread() else 0.0}

        t = time.monotonic()
        check = sim.check if isinstance(sim, SimulatorProcesses) else (lambda: None)   # a dead child: stop waiting
        wait_until(lambda: check() or m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] == devices, 120,
                   f"{devices} simulated devices to register")
        echo(f"{devices} simulated devices registered in {time.monotonic() - t:.1f}s (model run stubbed;"
             f" simulator in {processes or 'the manager'}{' child process(es)' if processes else ' process'})")
        for target in ("tiny@1.0.0", "tiny@2.0.0"):
            t, before = time.monotonic(), cpu()
            r = m.start_rollout(target, selector={"fleet": "sim"}, waves=waves, max_failure_rate=max_failure_rate,
                                bake_s=bake_s, gates=[], actor="simulator")
            s = wait_until(lambda rid=r["id"]: check() or (s := m.rollout_status(rid))["state"] in ("completed", "rolled_back") and s,
                           600, f"rollout of {target}", interval=0.5)   # each poll reads the whole rollout
            secs, after = time.monotonic() - t, cpu()
            spent = {k: round(after[k] - before[k], 2) for k in after}
            rec = {"target": target, "state": s["state"], "seconds": round(secs, 2), **spent,
                   "per_wave": s["per_wave"], "rollback": s["rollback"], "reason": s["reason"]}
            out["rollouts"].append(rec)
            echo(f"{target}: {s['state']} in {secs:.1f}s; per wave {s['per_wave']}"
                 + (f"; rollback {s['rollback']}; {s['reason']}" if s["reason"] else ""))
            echo("  " + where_time_went(rec, devices))
        wait_until(lambda: sim.versions() == {"tiny@1.0.0": devices}, 60, "every device back on 1.0.0")
        out["final_versions"] = sim.versions()
        echo(f"final: {out['final_versions']}")
    finally:
        with cleaning_up():     # a SIGTERM now waits until every child is stopped
            if sim is not None:
                sim.stop()
            if svc is not None:
                svc.stop()
            if broker is not None:
                broker.stop()
    return out


def where_time_went(rec: dict, devices: int) -> str:
    """One line: a rollout's wall time and the CPU seconds of each side (manager, simulator, broker)."""
    per = 1000.0 / max(devices, 1)
    return (f"wall {rec['seconds']:.1f}s; CPU: manager {rec['manager_cpu_s']:.1f}s"
            f" ({rec['manager_cpu_s'] * per:.2f} ms/device), simulator {rec['simulator_cpu_s']:.1f}s"
            f" ({rec['simulator_cpu_s'] * per:.2f} ms/device), broker {rec['broker_cpu_s']:.1f}s,"
            f" status polling {rec['main_thread_cpu_s']:.1f}s")
