"""``edgeml fleet demo --scenario drift``: drift found on shifted data, silence on clean data, the alert fires.

Real parts, on this machine, in well under two minutes: a broker, the manager (with its /metrics
and its webhook notifier, as ``edgeml fleet manager --metrics-port 0 --alert-webhook URL`` runs
them), two agents (subprocesses serving the compiled digits example over KServe v2 HTTP, sampling
every request into drift sketches), and a local webhook receiver that prints the Alertmanager JSON.

1. clean traffic: held-out digits (calib.npz; the reference profile was built from eval.npz) on
   both cameras -> ``drifted: false``, and no drift alert;
2. shifted traffic: cam-2's images inverted (1 - x) -> ``drifted: true`` with its Holm p-value
   and top features, per device only cam-2, and the notifier posts the EdgemlModelDrift alert.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.errors import FleetError
from edgeml.fleet.simulator_procs import cleaning_up, stops_children_on_signals
from edgeml.fleet.demo import _wait

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
DEVICES = ("cam-1", "cam-2")


def _infer(endpoint: str, image: np.ndarray) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "FP32",
                        "data": image.astype(np.float32).ravel().tolist()}]}
    req = urllib.request.Request(f"{endpoint}/v2/models/digits/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def _report(m: Any, by: str = "version") -> list[Any]:
    from edgeml.fleet.drift import analyze

    return analyze(m.db, m.config.store_path(), model="digits", by=by)


def _samples(m: Any) -> int:
    reps = _report(m)
    return reps[0].samples if reps else 0


def _line(rep: Any) -> str:
    top = ", ".join(f"{c.name} PSI {c.psi:.2f}" for c in rep.top[:3]) or "-"
    p = "n/a" if rep.p_value is None else f"{rep.p_value:.3g}"
    score = "n/a" if rep.score is None else f"{rep.score:.3f}"
    return (f"digits@{rep.version} [{rep.group}] drifted: {str(rep.drifted).lower()}  score (max PSI) {score}"
            f"  Holm p {p}  samples {rep.samples} in {rep.windows} window(s) from {rep.devices} device(s)"
            f"  top: {top}")


@stops_children_on_signals
def run_drift_demo(*, broker_kind: str = "auto", workdir: Path | None = None,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    import edgeml
    from edgeml.fleet.broker import Broker, free_port
    from edgeml.fleet.demo import DemoLog, stop_processes
    from edgeml.fleet.demo_alerts import WebhookReceiver
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.monitor_cli import Monitoring
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    demo = DemoLog("edgeml-demo-drift-", workdir, echo)
    work, say = demo.work, demo.say

    if not (DIGITS / "digits.onnx").is_file():
        raise FleetError(f"demo: the digits example is missing ({DIGITS}); run from a source checkout of edgeml")
    key, pub = generate_keypair(work / "signing.key", overwrite=True)
    art = edgeml.compile(str(DIGITS / "digits.onnx"), target="x86_64", output=str(work / "digits.edgepkg"),
                         calib=str(DIGITS / "calib.npz"), eval=str(DIGITS / "eval.npz"), backend="onnxruntime",
                         precision="fp32", sign_key=key, benchmark=False)
    say("compiled examples/digits (fp32, ONNX Runtime); drift_profile built from eval.npz (360 images)")
    receiver = WebhookReceiver(say)
    broker = Broker(work / "broker", kind=broker_kind, persistence=False).start()
    procs: list[subprocess.Popen[bytes]] = []
    svc = monitoring = None
    summary: dict[str, Any] = {"workdir": str(work), "broker": broker.kind}
    try:
        config = ManagerConfig(db=work / "fleet.db", http_port=free_port(), heartbeat_timeout_s=6, tick_s=0.2,
                               sign_key=key, health_window_s=0.5)
        svc = ManagerService(config, BrokerConfig(broker.url)).start()
        m = svc.manager
        monitoring = Monitoring(config.db, config.store_path(),
                                {"metrics_port": 0, "alert_webhook": receiver.url, "alert_interval": "1s"})
        say(f"broker {broker.kind} on {broker.url}; manager with /metrics on {monitoring.metrics_url} and its"
            f" webhook notifier (every 1 s) posting to {receiver.url}")
        m.publish_artifact(Path(art), "demo")
        for dev in DEVICES:
            log = open(work / f"{dev}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgeml.cli", "agent", "--broker", broker.url, "--device-id", dev,
                 "--labels", "fleet=demo", "--state-dir", str(work / dev), "--trusted-key", str(pub),
                 "--heartbeat", "1s", "--telemetry", "0.5s", "--health-window", "0.5s", "--http-port", "0",
                 "--drift-rate", "1", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            log.close()
        _wait(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1")[0] >= 2, 60, "2 agents online")
        r = m.start_rollout("digits@0.1.0", selector={"fleet": "demo"}, waves=[1.0], max_failure_rate=0.0,
                            bake_s=0.2, gates=[], actor="demo")
        _wait(lambda: m.rollout_status(r["id"])["state"] == "completed", 60, "digits@0.1.0 to roll out")
        ends = {d["device_id"]: d["endpoint"] for d in m.db.q("SELECT device_id, endpoint FROM devices")}
        if not all(ends.get(d) for d in DEVICES):
            raise FleetError(f"demo: an agent reported no HTTP endpoint ({ends}); see its log in {work}")
        say("digits@0.1.0 serving on cam-1 and cam-2; agents sample every request (--drift-rate 1) into sketches"
            " on the profile's bins, sent in telemetry every 0.5 s")
        summary.update(_clean_then_shifted(m, ends, receiver, say))
        metrics = urllib.request.urlopen(str(monitoring.metrics_url), timeout=10).read().decode()
        drift_lines = [ln for ln in metrics.splitlines() if ln.startswith("edgeml_fleet_drift_")]
        say("manager /metrics, drift series:\n  " + "\n  ".join(drift_lines))
        summary["metrics"] = drift_lines
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


def _clean_then_shifted(m: Any, ends: dict[str, str], receiver: Any, say: Callable[[str], None]) -> dict[str, Any]:
    clean = np.load(DIGITS / "calib.npz")["input"]          # held out: the profile comes from eval.npz
    for i, img in enumerate(clean):
        _infer(ends[DEVICES[i % 2]], img)
    _wait(lambda: _samples(m) >= len(clean), 30, "the clean sketches at the manager")
    time.sleep(1.2)                                          # the last telemetry windows of both agents
    rep_clean = _report(m)[0]
    say(f"clean traffic: {len(clean)} held-out digits (calib.npz) over both cameras (the agents' health probes"
        " are sampled too)\n  edgeml fleet drift: "
        + _line(rep_clean))
    time.sleep(2.5)                                          # two notifier rounds on the clean data
    quiet = not receiver.alerts("EdgemlModelDrift")
    say("no drift alert posted on clean data" if quiet else "unexpected: a drift alert fired on clean data")
    shifted = 1.0 - clean[:150]
    for img in shifted:
        _infer(ends["cam-2"], img)
    _wait(lambda: _samples(m) >= rep_clean.samples + len(shifted), 30, "the shifted sketches at the manager")
    rep_shift = _report(m)[0]
    per_device = _report(m, by="device")
    say(f"shifted traffic: {len(shifted)} inverted images (1 - x) to cam-2 only\n  edgeml fleet drift: "
        + _line(rep_shift) + "\n  edgeml fleet drift --by device:\n    " + "\n    ".join(_line(r) for r in per_device))
    alert = receiver.wait_for("EdgemlModelDrift", 20)
    say(f"the manager's notifier fired {alert['labels']['alertname']} for {alert['labels']['model']}@"
        f"{alert['labels']['version']}: {alert['annotations']['summary']}")
    return {"clean": rep_clean.to_dict(), "clean_alert_quiet": quiet, "shifted": rep_shift.to_dict(),
            "per_device": [r.to_dict() for r in per_device], "alert": alert, "webhook_payloads": receiver.payloads()}
