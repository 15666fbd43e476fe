"""The CLI against a running manager (commands go through the manager's SQLite file), and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeml.cli import main
from edgeml.fleet.agent import Agent, AgentConfig
from edgeml.fleet.serving import LocalServing
from edgeml.fleet.testing import wait_until
from edgeml.fleet.transport import BrokerConfig

pytestmark = pytest.mark.mqtt


def cli(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_fleet_cli_roundtrip(broker, start_manager, artifacts, keys, tmp_path):
    db = tmp_path / "fleet.db"
    svc = start_manager(broker.url, db=db)
    out = json.loads(cli("fleet", "publish", artifacts["v1"], "--db", db, "--trusted-key", keys["pub"], "--json").output)
    assert out["version"] == "1.0.0" and out["signed"]
    res = cli("fleet", "publish", artifacts["unsigned"], "--db", db, "--trusted-key", keys["pub"], ok=False)
    assert res.exit_code == 7 and "unsigned" in res.output

    agent = Agent(AgentConfig("cli-0", tmp_path / "cli-0", labels={"fleet": "cli", "hw": "x86"},
                              trusted_keys=[keys["pub"]], heartbeat_s=0.5, telemetry_s=0.5, health_window_s=0.2),
                  BrokerConfig(broker.url), LocalServing(tmp_path / "cli-0" / "cache")).start()
    try:
        wait_until(lambda: svc.manager.db.one("SELECT online FROM devices WHERE device_id = 'cli-0'"), 20, "agent")
        devices = json.loads(cli("fleet", "devices", "--db", db, "--selector", "fleet=cli", "--json").output)
        assert [d["device_id"] for d in devices] == ["cli-0"] and devices[0]["labels"]["hw"] == "x86"
        assert "cli-0" in cli("fleet", "devices", "--db", db).output

        res = cli("fleet", "rollout", "start", "tiny@9.9", "--db", db, "--selector", "fleet=cli", ok=False)
        assert res.exit_code == 10 and "not published" in res.output
        res = cli("fleet", "rollout", "start", "tiny@1.0.0", "--db", db, "--gate", "p95<<3", ok=False)
        assert res.exit_code == 2
        st = json.loads(cli("fleet", "rollout", "start", "tiny@1.0.0", "--db", db, "--selector", "fleet=cli",
                            "--waves", "100%", "--bake", "0.5s", "--gate", "p95_latency_ms<100", "--json").output)
        rid = st["id"]
        wait_until(lambda: json.loads(cli("fleet", "rollout", "status", rid, "--db", db, "--json").output)["state"]
                   == "completed", 30, "rollout to complete")
        assert "completed" in cli("fleet", "rollout", "status", "--db", db).output
        res = cli("fleet", "rollout", "pause", rid, "--db", db, ok=False)
        assert res.exit_code == 10 and "only a running rollout" in res.output
        wait_until(lambda: json.loads(cli("fleet", "telemetry", "--db", db, "--json").output)["versions"]
                   .get("tiny@1.0.0", {}).get("requests"), 10, "telemetry")
        assert "tiny@1.0.0" in cli("fleet", "telemetry", "--db", db, "--device", "cli-0").output
        cli("fleet", "rollout", "rollback", rid, "--db", db)
        wait_until(lambda: json.loads(cli("fleet", "rollout", "status", rid, "--db", db, "--json").output)["state"]
                   == "rolled_back", 30, "rollback")
        actors = {r["actor"] for r in svc.manager.db.q("SELECT actor FROM audit WHERE action LIKE 'rollout.%'")}
        assert actors - {"manager"}, "CLI actions are audited with the user's name"
    finally:
        agent.stop()


def test_agent_cli_refuses_without_keys(tmp_path):
    res = cli("agent", "--device-id", "x", "--state-dir", tmp_path, ok=False)
    assert res.exit_code == 2 and "--trusted-key" in res.output
    res = cli("agent", "--device-id", "bad id!", "--state-dir", tmp_path, "--allow-unsigned", ok=False)
    assert res.exit_code == 10


@pytest.mark.slow
def test_demo_with_amqtt_ends_on_its_own(tmp_path):
    pytest.importorskip("amqtt", reason="amqtt (pip extra 'demo') is not installed")
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "demo", "--broker-kind", "amqtt",
                           "--workdir", str(tmp_path / "demo"), "--bake", "1s"],
                          capture_output=True, text=True, timeout=150)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "broker: amqtt" in proc.stdout
    assert "tiny@1.0.0 completed; tiny@2.0.0 completed; tiny@3.0.0 rolled_back" in proc.stdout
    assert "'cam-001': '2.0.0', 'cam-002': '2.0.0', 'cam-003': '2.0.0'" in proc.stdout


def test_systemd_unit_uses_real_agent_options():
    import re
    from pathlib import Path

    from edgeml.fleet.cli import agent_cmd

    unit = (Path(__file__).parents[2] / "fleet" / "edgeml-agent.service").read_text()
    assert "ExecStart=" in unit and "Restart=always" in unit
    exec_start = unit.split("ExecStart=")[1].split("\n#")[0]
    flags = set(re.findall(r"(--[a-z-]+)", exec_start)) | set(re.findall(r"#\s+(--[a-z-]+)", unit))
    known = {o for p in agent_cmd.params for o in getattr(p, "opts", [])}
    assert flags <= known, flags - known


def test_manager_and_agent_commands_as_processes(broker, agents, artifacts, keys, tmp_path):
    """`edgeml fleet manager` and `edgeml agent` as real processes, driven by the CLI; SIGTERM stops both cleanly."""
    import signal

    from edgeml.fleet.broker import free_port

    db = tmp_path / "fleet.db"
    log = open(tmp_path / "manager.log", "wb")
    mgr = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "manager", "--broker", broker.url, "--db", db,
                            "--http-port", str(free_port()), "--sign-key", keys["key"], "--health-window", "0.3s",
                            "--heartbeat-timeout", "5s"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        cli("fleet", "publish", artifacts["v1"], "--db", db)
        agents.start("proc-0", broker.url, labels="fleet=proc")
        wait_until(lambda: json.loads(cli("fleet", "devices", "--db", db, "--selector", "fleet=proc", "--json").output),
                   30, "the agent to register")
        rid = json.loads(cli("fleet", "rollout", "start", "tiny@1.0.0", "--db", db, "--selector", "fleet=proc",
                             "--waves", "100%", "--bake", "0.2s", "--json").output)["id"]
        wait_until(lambda: json.loads(cli("fleet", "rollout", "status", rid, "--db", db, "--json").output)["state"]
                   == "completed", 30, "rollout to complete")
        dev = json.loads(cli("fleet", "devices", "--db", db, "--selector", "fleet=proc", "--json").output)[0]
        assert dev["active"] == "tiny@1.0.0" and dev["online"]
    finally:
        mgr.send_signal(signal.SIGTERM)
        assert mgr.wait(15) == 0, (tmp_path / "manager.log").read_text()[-2000:]
