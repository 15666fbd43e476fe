"""``edgeml fleet demo``: a whole fleet on one machine, narrated as it happens.

Broker (Mosquitto when installed, else amqtt), the manager (in this process),
three agents (real subprocesses running ``edgeml agent``), then:
v1 to everyone, v2 with a canary wave and a latency gate, telemetry, and a
deliberately broken v3 (its golden outputs do not match) that fails the
canary's self-test and is rolled back automatically. Ends on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from edgeml.errors import FleetError
from edgeml.fleet.simulator_procs import cleaning_up, stops_children_on_signals


class DemoLog:
    """A demo's work folder and its timestamped echo (``[  12.3s] message``), shared by every scenario."""

    def __init__(self, prefix: str, workdir: Path | None, echo: Callable[[str], None]):
        self.t0 = time.monotonic()
        self.work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=prefix))
        self.work.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        self.echo(f"[{self.elapsed():6.1f}s] {msg}")


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process still running, then wait for each; kill what outlives ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


@stops_children_on_signals
def run_demo(*, broker_kind: str = "auto", workdir: Path | None = None, bake_s: float = 3.0,
             echo: Callable[[str], None] = print, timeout_s: float = 120.0) -> dict:
    from edgeml.fleet.broker import Broker, free_port
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.testing import make_artifact
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    demo = DemoLog("edgeml-demo-", workdir, echo)
    work, say = demo.work, demo.say

    key, pub = generate_keypair(work / "signing.key", overwrite=True)
    arts = {v: make_artifact(work / f"tiny-{v}.edgepkg", "tiny", v, sign_key=key,
                             kind="bad_golden" if v == "3.0.0" else "good") for v in ("1.0.0", "2.0.0", "3.0.0")}
    say(f"built 3 signed artifacts in {work} (v3 has wrong golden outputs on purpose)")
    broker = Broker(work / "broker", kind=broker_kind, persistence=False).start()
    say(f"broker: {broker.kind} on {broker.url}" + (" (MQTT 3.1.1 only: clients fall back)" if broker.kind == "amqtt" else ""))
    agents: list[subprocess.Popen] = []
    svc = None
    summary: dict = {"workdir": str(work), "broker": broker.kind, "rollouts": []}
    try:
        config = ManagerConfig(db=work / "fleet.db", http_port=free_port(), heartbeat_timeout_s=6, tick_s=0.2,
                               sign_key=key, health_window_s=1.0, offline_timeout_s=30)
        svc = ManagerService(config, BrokerConfig(broker.url)).start()
        m = svc.manager
        for v, path in arts.items():
            rec = m.publish_artifact(path, "demo")
            say(f"published tiny@{v} sha256 {rec['sha256'][:12]}...")
        for i, site in enumerate(("berlin", "paris", "rome")):
            dev = f"cam-{i + 1:03d}"
            log = open(work / f"{dev}.log", "wb")
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "edgeml.cli", "agent", "--broker", broker.url, "--device-id", dev,
                 "--labels", f"site={site},fleet=demo", "--state-dir", str(work / dev), "--trusted-key", str(pub),
                 "--heartbeat", "1s", "--telemetry", "2s", "--health-window", "1s", "--http-port", "0",
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        say("started 3 agents (cam-001..003) as subprocesses")
        _wait(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] >= 3, 60, "3 agents to come online")
        say("3 devices online: " + ", ".join(r["device_id"] for r in m.db.q("SELECT device_id FROM devices")))

        def rollout(target: str, waves: list[float], gates: list[str]) -> dict:
            r = m.start_rollout(target, selector={"fleet": "demo"}, waves=waves, max_failure_rate=0.1, bake_s=bake_s,
                                gates=gates, actor="demo")
            say(f"rollout {r['id']}: {target} waves {r['waves']} gates {['failure_rate<=10%'] + gates}")
            seen_events = m.db.one("SELECT COUNT(*) FROM events")[0]
            last = None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for e in m.db.q("SELECT * FROM events ORDER BY received_at LIMIT -1 OFFSET ?", (seen_events,)):
                    seen_events += 1
                    if e["state"] in ("committed", "failed", "rolled_back", "selftest", "swapped"):
                        dep = m.db.one("SELECT kind FROM deployments WHERE deployment_id = ?", (e["deployment_id"],))
                        what = "rollback" if dep and dep["kind"] == "rollback" else "install"
                        say(f"  {e['device_id']}: {what} {e['state']}" + (f" ({e['reason']})" if e["reason"] else ""))
                s = m.rollout_status(r["id"])
                key_ = (s["state"], s["wave"])
                if key_ != last:
                    last = key_
                    say(f"  rollout {s['id']} {s['state']} wave {s['wave']}/{len(s['waves'])}"
                        + (f": {s['reason']}" if s["reason"] else ""))
                if s["state"] in ("completed", "rolled_back", "aborted"):
                    summary["rollouts"].append({"target": target, "state": s["state"], "reason": s["reason"]})
                    return s
                time.sleep(0.2)
            raise FleetError(f"demo rollout of {target} did not finish within {timeout_s}s")

        rollout("tiny@1.0.0", [1.0], [])
        rollout("tiny@2.0.0", [0.33, 1.0], ["p95_latency_ms<50"])
        endpoints = {r["device_id"]: r["endpoint"] for r in m.db.q("SELECT device_id, endpoint FROM devices")
                     if r["endpoint"]}
        if endpoints:
            sent = _drive_traffic(list(endpoints.values()), seconds=4.5)
            say(f"sent {sent} KServe v2 inference requests over HTTP to {len(endpoints)} devices in 4.5s")
        else:
            time.sleep(2.5)
        say("telemetry (last report of each device; histograms merged across devices):")
        for row in m.db.q("SELECT name, version, SUM(requests) r, SUM(failures) f, COUNT(*) n FROM telemetry"
                          " GROUP BY name, version"):
            stats = m._version_stats(row["name"], [row["version"]], None)
            say(f"  tiny@{row['version']}: {row['n']} device(s), {row['r']} requests, {row['f']} failures,"
                f" p95 <= {stats.p95()} ms")
        for row in m.db.q("SELECT * FROM device_telemetry ORDER BY device_id"):
            active = json.loads(row["active"]) if row["active"] else {}
            say(f"  {row['device_id']}: active {active.get('version')}, {row['throughput_rps']} req/s,"
                f" cpu {row['cpu_percent']}%, rss {row['memory_mb']} MB")
        s = rollout("tiny@3.0.0", [0.33, 1.0], ["p95_latency_ms<50"])
        versions = {r["device_id"]: (json.loads(r["active"]) or {}).get("version") if r["active"] else None
                    for r in m.db.q("SELECT device_id, active FROM devices ORDER BY device_id")}
        say(f"after the broken v3: devices serve {versions}")
        summary["final_versions"] = versions
        summary["v3_state"] = s["state"]
    finally:
        with cleaning_up():   # a second SIGTERM/SIGINT waits: every child gets stopped
            stop_processes(agents)
            if svc is not None:
                svc.stop()
            broker.stop()
    summary["seconds"] = demo.elapsed()
    say(f"done: agents, manager and broker stopped; files in {work}")
    return summary


def _drive_traffic(endpoints: list[str], seconds: float, threads_per_device: int = 2) -> int:
    """Send the tiny model's infer request to every endpoint for ``seconds`` (keep-alive connections)."""
    import http.client
    import threading
    from urllib.parse import urlparse

    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(url: str) -> None:
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=5)
        n = 0
        try:
            while time.monotonic() < stop:
                conn.request("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
                conn.getresponse().read()
                n += 1
        except OSError:
            pass
        finally:
            conn.close()
            with lock:
                count[0] += n

    ts = [threading.Thread(target=worker, args=(u,)) for u in endpoints for _ in range(threads_per_device)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return count[0]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise FleetError(f"demo: timed out waiting for {what}")


if __name__ == "__main__":  # pragma: no cover
    run_demo()
    os._exit(0)
