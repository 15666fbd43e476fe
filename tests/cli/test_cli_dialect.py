"""One dialect: target-name completion, ``edgeml doctor``, aligned tables with reasons never cut, the top class
of a classifier, the agent's banner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgeml.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_completion_lists_target_names():
    env = {**os.environ, "COMP_WORDS": "edgeml compile m.onnx -t x86_64-avx", "COMP_CWORD": "4",
           "_EDGEML_COMPLETE": "bash_complete"}
    out = subprocess.run([sys.executable, "-c", "from edgeml.cli import main; main(prog_name='edgeml')"], env=env,
                         capture_output=True, text=True, timeout=60)
    names = {line.split(",", 1)[1] for line in out.stdout.split()}
    assert {"x86_64-avx2", "x86_64-avx512-vnni", "x86_64-avx512-bf16"} <= names and "x86_64" not in names


def test_doctor_reports_an_unreachable_broker_and_a_foreign_database(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 10)
    res = CliRunner().invoke(main, ["doctor", "--broker", f"mqtt://127.0.0.1:{port}", "--db", str(junk), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["check"]: r for r in json.loads(res.output)}
    assert rows["broker"]["status"] == "missing" and f"127.0.0.1:{port}" in rows["broker"]["detail"]
    assert rows["database"]["status"] == "missing" and "not a fleet database" in rows["database"]["detail"]
    assert rows["onnxruntime"]["status"] == "ok"
    assert "best" in rows["targets"]["detail"]
    human = CliRunner().invoke(main, ["doctor", "--broker", f"mqtt://127.0.0.1:{port}", "--db", str(junk)])
    assert "MISSING" in human.output and "AREA" in human.output


def test_candidate_table_keeps_full_reasons_and_any_status():
    from edgeml.cli_format import candidate_rows, num

    long_reason = "verification on this host failed: " + "x" * 200
    lines = candidate_rows([
        {"label": "onnxruntime/fp32", "status": "selected", "selected": True, "accuracy": 99.4444,
         "accuracy_drop": 0.0, "latency_ms": {"p50": 0.0396, "p90": 0.05571}},
        {"label": "tvm/fp32/untuned", "status": "unverified", "reason": long_reason,
         "verification": {"host": "x86_64-avx2", "max_abs_error": 0.0123456789}},
        {"label": "openvino/int8/nncf", "status": "failed", "reason": "build error"},
    ])
    assert lines[0].split() == ["CANDIDATE", "STATUS", "ACCURACY", "DROP", "P50", "MS", "P90", "MS", "REASON"]
    assert long_reason in lines[2] and "unverified" in lines[2] and "max_abs_error=0.01235" in lines[2]
    assert lines[3].split()[1] == "failed" and lines[3].endswith("build error")
    assert lines[1].index("selected") == lines[2].index("unverified") == lines[3].index("failed")   # aligned
    assert lines[1].startswith(">") and "0.040" in lines[1]
    assert num(0.07139400008782104) == "0.07139" and num(None) == "-" and num(3) == "3"


def test_inspect_is_a_table_without_python_reprs(tmp_path):
    from edgeml.fleet.testing import make_artifact

    art = make_artifact(tmp_path / "tiny.edgepkg", "tiny", "1.0.0")
    res = CliRunner().invoke(main, ["inspect", str(art)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("artifact ") and "target " in res.output
    assert "{'" not in res.output and "p50=-" not in res.output


def test_run_shows_the_top_class_of_a_classifier(tmp_path):
    """The shipped digits model compiled with labelled eval data: `run` names each sample's class."""
    out = tmp_path / "d.edgepkg"
    digits = REPO / "examples" / "digits"
    res = CliRunner().invoke(main, ["compile", str(digits / "digits.onnx"), "-t", "x86_64", "--backend", "onnxruntime",
                                    "--precision", "fp32", "--eval", str(digits / "eval.npz"), "--no-benchmark",
                                    "--no-cache", "-q", "-o", str(out)])
    assert res.exit_code == 0, res.output
    run = CliRunner().invoke(main, ["run", str(out), "--input", str(digits / "sample.npz")])
    assert run.exit_code == 0, run.output
    assert "sample 0: top class 1 (p=" in run.output and "sample 3: top class" in run.output
    assert "[[" not in run.output      # no raw logits matrix for a classifier


def test_agent_banner_names_no_model_instead_of_none(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from edgeml.fleet.broker import Broker, mosquitto_binary

    if not mosquitto_binary():
        import pytest

        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    broker = Broker(tmp_path / "m", kind="mosquitto").start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "agent", "--broker", broker.url, "--device-id",
                                 "b1", "--state-dir", str(tmp_path / "b1"), "--allow-unsigned", "--port", str(port),
                                 "--connect-timeout", "20s", "--log-level", "warning"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(15)
    finally:
        broker.stop()
    assert "serving no model yet (waiting for a rollout)" in line and "None" not in line


def test_bench_report_lists_every_file_it_writes(tmp_path):
    from edgeml.fleet.testing import make_artifact

    art = make_artifact(tmp_path / "tiny.edgepkg", "tiny", "1.0.0")
    res = CliRunner().invoke(main, ["bench", str(art), "--duration", "200ms", "--repeats", "1", "--warmup", "0s",
                                    "--min-queries", "8", "--no-sweep", "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    written = {line.split("wrote ", 1)[1].strip() for line in res.output.splitlines() if "  wrote " in line}
    on_disk = {str(p) for p in (tmp_path / "rep").iterdir()}
    assert on_disk == written and any(p.endswith(".png") for p in written)


def test_config_file_sets_defaults_and_refuses_typos(tmp_path):
    """$EDGEML_CONFIG: one table per command; the command line and environment variables still win."""
    def run(config: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        cfg = tmp_path / "config.toml"
        cfg.write_text(config)
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
        full.update({"EDGEML_CONFIG": str(cfg), **(env or {})})
        return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True,
                              timeout=60, env=full)

    from_file = tmp_path / "from-file.db"
    res = run(f'[fleet.devices]\ndb = "{from_file}"\n', "fleet", "devices")
    assert res.returncode == 10 and f"fleet database {from_file} does not exist" in res.stderr
    res = run(f'[fleet.devices]\ndb = "{from_file}"\n', "fleet", "devices", "--db", str(tmp_path / "cli.db"))
    assert "cli.db does not exist" in res.stderr                         # the command line wins
    res = run('[agent]\nbroker = "mqtt://127.0.0.1:1"\n', "agent", "--device-id", "c1", "--state-dir",
              str(tmp_path / "c1"), "--allow-unsigned", "--port", "-1", "--connect-timeout", "500ms",
              env={"EDGEML_BROKER": "mqtt://127.0.0.1:2"})
    assert res.returncode == 10 and "127.0.0.1:2" in res.stderr          # the variable wins over the file
    res = run('[serve]\nprot = 8000\n', "targets")
    assert res.returncode == 2 and "[serve] prot is not an edgeml option" in res.stderr and "port" in res.stderr
    res = run('[servee]\nport = 8000\n', "targets")
    assert res.returncode == 2 and "edgeml servee is not an edgeml command" in res.stderr
    res = run("[serve\n", "targets")
    assert res.returncode == 2 and "is not valid TOML" in res.stderr
