"""``edgeml fleet demo --scenario experiment``: a real broker, manager and two agents serving real ONNX models;
a shadow experiment with its agreement, then an A/B test driven by simulated user feedback to its decision
(with the p-value), then the promotion rolls the challenger out. Under two minutes on a laptop."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.fleet.demo import _wait


def _post(url: str, doc: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _infer(port: int, x: np.ndarray, rid: str) -> str:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return str(_post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", body, {"X-Request-ID": rid})["model_version"])


def run_experiment_demo(*, broker_kind: str = "auto", workdir: Path | None = None,
                        echo: Callable[[str], None] = print) -> dict[str, Any]:
    from edgeml.fleet.broker import Broker, free_port
    from edgeml.fleet.experiment_cli import status_text
    from edgeml.fleet.experiments import status
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.testing import make_artifact
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    t0 = time.monotonic()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgeml-demo-exp-"))
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        echo(f"[{time.monotonic() - t0:6.1f}s] {msg}")

    key, pub = generate_keypair(work / "signing.key", overwrite=True)
    broker = Broker(work / "broker", kind=broker_kind, persistence=False).start()
    procs: list[subprocess.Popen[bytes]] = []
    svc = None
    ports: dict[str, int] = {}
    summary: dict[str, Any] = {"workdir": str(work), "broker": broker.kind}
    try:
        svc = ManagerService(ManagerConfig(db=work / "fleet.db", http_port=free_port(), heartbeat_timeout_s=6,
                                           tick_s=0.2, sign_key=key, health_window_s=0.5),
                             BrokerConfig(broker.url)).start()
        m = svc.manager
        for v in ("1.0.0", "2.0.0"):
            m.publish_artifact(make_artifact(work / f"tiny-{v}.edgepkg", "tiny", v, sign_key=key), "demo")
        say(f"broker {broker.kind} on {broker.url}; published tiny@1.0.0 (champion) and tiny@2.0.0 (challenger)")
        for i in range(2):
            dev = f"shop-{i + 1}"
            ports[dev] = free_port()
            log = open(work / f"{dev}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgeml.cli", "agent", "--broker", broker.url, "--device-id", dev,
                 "--labels", "fleet=demo", "--state-dir", str(work / dev), "--trusted-key", str(pub),
                 "--heartbeat", "1s", "--telemetry", "1s", "--health-window", "0.5s", "--http-port", str(ports[dev]),
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        _wait(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] >= 2, 60, "2 agents online")
        r = m.start_rollout("tiny@1.0.0", selector={"fleet": "demo"}, waves=[1.0], max_failure_rate=0.0, bake_s=0.1,
                            gates=[], actor="demo")
        _wait(lambda: m.rollout_status(r["id"])["state"] == "completed", 60, "the champion to roll out")
        _wait(lambda: all(json.loads(d["active"] or "{}").get("version") == "1.0.0"
                          for d in m.db.q("SELECT active FROM devices")), 20, "the registry to show 1.0.0")
        say("champion tiny@1.0.0 serving on shop-1 and shop-2 (embedded KServe v2 servers)")

        def start(args: dict[str, Any]) -> str:
            st = m.execute("experiment.start", {"champion": "tiny@1.0.0", "challenger": "tiny@2.0.0",
                                                "selector": {"fleet": "demo"}, **args}, "demo")
            _wait(lambda: status(m.db, st["id"])["reporting"] == 2, 30, "both devices to run the experiment")
            return str(st["id"])

        # -- shadow ---------------------------------------------------------------
        eid = start({"name": "shadow-demo", "mode": "shadow", "sample": 0.5})
        rng = np.random.default_rng(0)
        served = {_infer(port, rng.standard_normal((1, 4)).astype(np.float32), f"s{i}-{dev}")
                  for i in range(100) for dev, port in ports.items()}
        _wait(lambda: status(m.db, eid)["shadow"]["compared"] >= 60, 20, "shadow comparisons to arrive")
        time.sleep(1.5)
        s = m.execute("experiment.stop", {"id": eid}, "demo")
        say(f"shadow: 200 requests, clients saw only {sorted(served)}\n" + status_text(s))
        summary["shadow"] = s["shadow"]

        # -- A/B ------------------------------------------------------------------
        eid = start({"name": "ab-demo", "mode": "ab", "split": 0.5, "baseline": 0.5, "mde": 0.15})
        horizon = status(m.db, eid)["decision"]["horizon_per_arm"]
        say(f"A/B: fixed horizon {horizon} outcomes per arm (baseline 50 %, detect +15 points, alpha 5 %, power 80 %);"
            " simulated users: champion answers satisfy 50 %, challenger 68 %")
        users = random.Random(1)
        count = {"1.0.0": 0, "2.0.0": 0}
        i = 0
        while min(count.values()) < horizon and i < 20 * horizon:
            dev = f"shop-{i % 2 + 1}"
            v = _infer(ports[dev], np.ones((1, 4), np.float32), f"ab{i}")
            count[v] += 1
            ok = users.random() < (0.68 if v == "2.0.0" else 0.5)
            _post(f"http://127.0.0.1:{ports[dev]}/v2/models/tiny/feedback", {"id": f"ab{i}", "reward": int(ok)})
            i += 1
        _wait(lambda: status(m.db, eid)["decision"]["decision"] != "continue", 20, "the decision at the horizon")
        s = status(m.db, eid)
        say("A/B reached its horizon:\n" + status_text(s))
        summary["ab"] = {"decision": s["decision"], "test": s["test"]}
        if s["decision"]["decision"] == "promote":
            out = m.execute("experiment.promote", {"id": eid}, "demo")
            _wait(lambda: m.rollout_status(out["rollout"]["id"])["state"] == "completed", 60, "the promotion rollout")
            say(f"promoted: rollout {out['rollout']['id']} of tiny@2.0.0 completed")
            summary["promoted"] = True
        else:
            m.execute("experiment.stop", {"id": eid}, "demo")
            summary["promoted"] = False
        summary["seconds"] = round(time.monotonic() - t0, 1)
        return summary
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if svc is not None:
            svc.stop()
        broker.stop()
