"""``edgeml fleet demo --scenario experiment``: a real broker, manager and two agents serving real ONNX models;
a shadow experiment with its agreement, then an A/B test driven by simulated user feedback to its decision
(with the p-value), then the promotion rolls the challenger out; last, an A/B test against a broken challenger
(its lookup table is one entry short: it passes its self-test and warm-up, then fails live requests) fires the manager's
EdgemlExperimentArmErrorRate alert to a local webhook receiver, and stopping it resolves the alert; the
alerts that stay quiet are listed with their measured values. Under two minutes on a laptop."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.fleet.demo import _wait
from edgeml.fleet.simulator_procs import cleaning_up, stops_children_on_signals


def _post(url: str, doc: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _infer(port: int, x: np.ndarray, rid: str) -> str:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return str(_post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", body, {"X-Request-ID": rid})["model_version"])


@stops_children_on_signals
def run_experiment_demo(*, broker_kind: str = "auto", workdir: Path | None = None,
                        echo: Callable[[str], None] = print) -> dict[str, Any]:
    from edgeml.fleet.broker import Broker, free_port
    from edgeml.fleet.demo import DemoLog, stop_processes
    from edgeml.fleet.demo_alerts import WebhookReceiver
    from edgeml.fleet.experiment_cli import status_text
    from edgeml.fleet.experiments import status
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.monitor_cli import Monitoring
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.testing import make_artifact
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    demo = DemoLog("edgeml-demo-exp-", workdir, echo)
    work, say = demo.work, demo.say

    key, pub = generate_keypair(work / "signing.key", overwrite=True)
    broker = Broker(work / "broker", kind=broker_kind, persistence=False).start()
    procs: list[subprocess.Popen[bytes]] = []
    svc = monitoring = None
    receiver = WebhookReceiver(say)
    ports: dict[str, int] = {}
    summary: dict[str, Any] = {"workdir": str(work), "broker": broker.kind}
    try:
        config = ManagerConfig(db=work / "fleet.db", http_port=free_port(), heartbeat_timeout_s=6, tick_s=0.2,
                               sign_key=key, health_window_s=0.5)
        svc = ManagerService(config, BrokerConfig(broker.url)).start()
        m = svc.manager
        monitoring = Monitoring(config.db, config.store_path(),
                                {"metrics_port": 0, "alert_webhook": receiver.url, "alert_interval": "1s"})
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            m.publish_artifact(make_artifact(work / f"tiny-{v}.edgepkg", "tiny", v, sign_key=key,
                                             kind="bad_lookup" if v == "3.0.0" else "good"), "demo")
        say(f"broker {broker.kind} on {broker.url}; published tiny@1.0.0 (champion), tiny@2.0.0 (challenger) and"
            f" tiny@3.0.0 (broken: a lookup out of range on inputs holding 1.0); the manager's notifier posts alerts to {receiver.url}")
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
            " simulated users: champion answers satisfy 50 %, challenger 75 %")
        users = random.Random(1)
        count = {"1.0.0": 0, "2.0.0": 0}
        i = 0
        while min(count.values()) < horizon and i < 20 * horizon:
            dev = f"shop-{i % 2 + 1}"
            v = _infer(ports[dev], np.ones((1, 4), np.float32), f"ab{i}")
            count[v] += 1
            # +25 points against a design for +15: the demo's decision must not hinge on a 20 % miss
            ok = users.random() < (0.75 if v == "2.0.0" else 0.5)
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
        champion = "tiny@2.0.0" if summary["promoted"] else "tiny@1.0.0"
        summary["alerts"] = _guardrail(m, ports, receiver, say, champion, str(monitoring.metrics_url))
        summary["seconds"] = round(demo.elapsed(), 1)
        return summary
    finally:
        with cleaning_up():   # a second SIGTERM/SIGINT waits: every child gets stopped
            stop_processes(procs)
            if monitoring is not None:
                monitoring.stop()
            if svc is not None:
                svc.stop()
            broker.stop()
            receiver.close()


def _try_infer(port: int, rid: str) -> bool:
    """One request; False when the server answered an error (the broken challenger)."""
    try:
        _infer(port, np.ones((1, 4), np.float32), rid)
        return True
    except urllib.error.HTTPError:
        return False


def _guardrail(m: Any, ports: dict[str, int], receiver: Any, say: Callable[[str], None], champion: str,
               metrics_url: str) -> dict[str, Any]:
    """A/B against the broken tiny@3.0.0: the arm error-rate alert fires, then resolves when the test is stopped."""
    from edgeml.fleet.demo_alerts import quiet_reasons
    from edgeml.fleet.experiments import status

    st = m.execute("experiment.start", {"name": "guardrail-demo", "mode": "ab", "split": 0.5, "champion": champion,
                                        "challenger": "tiny@3.0.0", "selector": {"fleet": "demo"}}, "demo")
    _wait(lambda: status(m.db, st["id"])["reporting"] == 2, 30, "both devices to run the guardrail experiment")
    failed = sum(not _try_infer(ports[f"shop-{i % 2 + 1}"], f"g{i}") for i in range(300))
    say(f"A/B {champion} vs the broken tiny@3.0.0: 300 requests, {failed} answered with an error")
    alert = receiver.wait_for("EdgemlExperimentArmErrorRate", 30)
    say(f"the manager's notifier fired {alert['labels']['alertname']}: {alert['annotations']['summary']}")
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    arms = [ln for ln in text.splitlines() if ln.startswith(("edgeml_fleet_experiment_arm_requests_total",
                                                              "edgeml_fleet_experiment_arm_failures_total"))
            and f'experiment="{st["id"]}"' in ln]
    say("manager /metrics, the experiment's arms:\n  " + "\n  ".join(arms))
    m.execute("experiment.stop", {"id": st["id"]}, "demo")
    resolved = receiver.wait_for("EdgemlExperimentArmErrorRate", 30, status="resolved")
    say(f"experiment stopped: the notifier posted {resolved['labels']['alertname']} resolved")
    fired = {a["labels"]["alertname"] for p in receiver.payloads() for a in p["alerts"]}
    quiet = quiet_reasons(m.db, fired)
    say("alerts that stayed quiet, with the measured values:\n  " + "\n  ".join(quiet))
    return {"fired": alert, "resolved": resolved, "failed_requests": failed, "quiet": quiet, "metrics": arms}
