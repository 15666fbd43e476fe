"""Issue 24's table, one row per mistake a new user makes: each runs the real ``edgeml`` (a subprocess) and checks
the one-line message and the exit code -- the same code for the same mistake in every command (README "Exit
codes", ``edgeml --help``). No row may print a traceback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ONNX = REPO / "examples" / "digits" / "digits.onnx"
SAMPLE = REPO / "examples" / "digits" / "sample.npz"


def edgeml(*args, cwd: Path | None = None, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    from edgeml.fleet.testing import make_artifact

    return make_artifact(tmp_path_factory.mktemp("art") / "tiny.edgepkg", "tiny", "1.0.0")


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as s:      # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# (id, argv (ART/PORT/CLOSED/TMP/BUSY placeholders), exit code, substrings of stderr/stdout)
ROWS = [
    # row 2: a broker URL typo or a closed port: a WARNING with the reason, --connect-timeout exits 10
    ("agent-broker-typo", ["agent", "--broker", "mqtt://locahost:1883", "--device-id", "d1", "--state-dir", "TMP/a",
                           "--allow-unsigned", "--port", "-1", "--connect-timeout", "2s"], 10,
     ["warning cannot connect to locahost:1883", "error: cannot reach the MQTT broker locahost:1883 within 2s"]),
    ("manager-broker-closed", ["fleet", "manager", "--broker", "mqtt://127.0.0.1:CLOSED", "--db", "TMP/f.db",
                               "--port", "0", "--connect-timeout", "2s"], 10,
     ["warning cannot connect to 127.0.0.1:CLOSED", "Connection refused",
      "error: cannot reach the MQTT broker 127.0.0.1:CLOSED"]),
    # row 3: every port option range-checked with one message; a taken port names the option and the port
    ("manager-port-range", ["fleet", "manager", "--db", "TMP/f.db", "--port", "70000"], 2,
     ["error: --port: 70000 is not a port: give 1-65535, or 0 to pick a free one"]),
    ("manager-old-port-name", ["fleet", "manager", "--db", "TMP/f.db", "--http-port", "70000"], 2,
     ["error: --port: 70000 is not a port"]),
    ("agent-port-range", ["agent", "--device-id", "d1", "--state-dir", "TMP/a", "--allow-unsigned", "--port", "70000"],
     2, ["error: --port: 70000 is not a port"]),
    ("serve-port-range", ["serve", "ART", "--port", "70000"], 2, ["error: --port: 70000 is not a port"]),
    ("manager-metrics-port-range", ["fleet", "manager", "--db", "TMP/f.db", "--metrics-port", "65536"], 2,
     ["error: --metrics-port: 65536 is not a port"]),
    ("serve-grpc-port-range", ["serve", "ART", "--grpc-port", "-3"], 2, ["error: --grpc-port: -3 is not a port"]),
    ("manager-port-taken", ["fleet", "manager", "--db", "TMP/f.db", "--port", "BUSY", "--broker",
                            "mqtt://127.0.0.1:CLOSED"], 2, ["error: --port BUSY: the port is already in use"]),
    ("manager-metrics-port-taken", ["fleet", "manager", "--db", "TMP/f.db", "--port", "0", "--metrics-port", "BUSY",
                                    "--broker", "mqtt://127.0.0.1:CLOSED"], 2,
     ["error: --metrics-port BUSY: the port is already in use"]),
    ("serve-port-taken", ["serve", "ART", "--port", "BUSY"], 2, ["error: --port BUSY: the port is already in use"]),
    ("agent-port-taken", ["agent", "--device-id", "d1", "--state-dir", "TMP/a", "--allow-unsigned", "--port", "BUSY",
                          "--broker", "mqtt://127.0.0.1:CLOSED"], 2,
     ["error: --port BUSY: the port is already in use"]),
    # row 4: a missing --input says so, whatever the other options
    ("run-input-missing", ["run", "ART", "--input", "TMP/missing.npz"], 5, ["error: --input TMP/missing.npz does not exist"]),
    ("run-input-missing-with-output", ["run", "ART", "--input", "TMP/missing.npz", "--output", "TMP/out"], 5,
     ["does not exist"]),
    # row 8: an .onnx, a folder or a missing file where an artifact is expected: the same message and code (7)
    ("inspect-onnx", ["inspect", ONNX], 7, ["is an ONNX model, not an artifact: compile it first",
                                            "hint: edgeml compile", "--target TARGET -o digits.edgepkg"]),
    ("serve-onnx", ["serve", ONNX], 7, ["is an ONNX model, not an artifact: compile it first"]),
    ("run-onnx", ["run", ONNX, "--input", SAMPLE], 7, ["is an ONNX model, not an artifact"]),
    ("inspect-folder", ["inspect", "TMP"], 7, ["is a folder, not an .edgepkg file"]),
    ("serve-folder", ["serve", "TMP"], 7, ["is a folder, not an .edgepkg file"]),
    ("bench-folder", ["bench", "TMP"], 7, ["is a folder, not an .edgepkg file"]),
    ("inspect-missing", ["inspect", "TMP/nope.edgepkg"], 7, ["artifact TMP/nope.edgepkg does not exist"]),
    ("serve-missing", ["serve", "TMP/nope.edgepkg"], 7, ["artifact TMP/nope.edgepkg does not exist"]),
    ("bench-missing", ["bench", "TMP/nope.edgepkg"], 7, ["artifact TMP/nope.edgepkg does not exist"]),
    ("publish-onnx", ["fleet", "publish", ONNX, "--db", "TMP/f.db"], 7, ["is an ONNX model"]),
    # a --trusted-key that is not there: the same message and code whatever the command
    ("inspect-key-missing", ["inspect", "ART", "--trusted-key", "TMP/nope.pub"], 7, ["cannot read public key"]),
    ("serve-key-missing", ["serve", "ART", "--trusted-key", "TMP/nope.pub"], 7, ["cannot read public key"]),
    ("run-key-missing", ["run", "ART", "--input", SAMPLE, "--trusted-key", "TMP/nope.pub"], 7,
     ["cannot read public key"]),
    ("publish-key-missing", ["fleet", "publish", "ART", "--db", "TMP/f.db", "--trusted-key", "TMP/nope.pub"], 7,
     ["cannot read public key"]),
    ("agent-key-missing", ["agent", "--device-id", "d1", "--state-dir", "TMP/a", "--trusted-key", "TMP/nope.pub"], 7,
     ["cannot read public key"]),
    # row 10: --log-level is a fixed choice; click's own errors in edgeml's format
    ("log-level-choice", ["agent", "--device-id", "d1", "--state-dir", "TMP/a", "--log-level", "verbose"], 2,
     ["error: --log-level: 'verbose' is not one of", "hint: see 'edgeml agent --help'"]),
    ("log-format-choice", ["fleet", "manager", "--db", "TMP/f.db", "--log-format", "xml"], 2,
     ["error: --log-format: 'xml' is not one of 'text', 'json'"]),
    ("unknown-option-did-you-mean", ["serve", "ART", "--prot", "1"], 2, ["No such option '--prot'", "--port"]),
    # row 6: --watch needs a rollout id
    ("watch-needs-id", ["fleet", "rollout", "status", "--watch", "--db", "DB"], 2, ["--watch follows one rollout"]),
    # row 7: an unpublished target names the published one; forgetting an unknown device
    ("rollout-did-you-mean", ["fleet", "rollout", "start", "tin@1.0.0", "--db", "DB"], 10,
     ["tin@1.0.0 is not published", "did you mean tiny@1.0.0?"]),
    ("rollout-not-name-at-version", ["fleet", "rollout", "start", "tiny", "--db", "DB"], 2, ["must be NAME@VERSION"]),
    ("forget-unknown", ["fleet", "devices", "forget", "cam-9", "--db", "DB"], 10, ["no device 'cam-9' is registered"]),
    ("wait-online-times-out", ["fleet", "devices", "--wait-online", "1", "--timeout", "1s", "--db", "DB"], 10,
     ["0 of the 1 device(s) wanted are online after 1s"]),
]


@pytest.fixture(scope="module")
def db(tmp_path_factory, art) -> Path:
    """A fleet database with tiny@1.0.0 published (no manager needed for the reads and refusals)."""
    path = tmp_path_factory.mktemp("db") / "fleet.db"
    res = edgeml("fleet", "publish", art, "--db", path)
    assert res.returncode == 0, res.stderr
    return path


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_cli_row(row, tmp_path, art, closed_port, busy_port, db):
    _, argv, code, expected = row
    subst = {"ART": str(art), "TMP": str(tmp_path), "CLOSED": str(closed_port), "BUSY": str(busy_port), "DB": str(db)}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    res = edgeml(*[fill(str(a)) for a in argv])
    out = res.stderr + res.stdout
    assert res.returncode == code, out
    for text in expected:
        assert fill(text) in out, out
    assert "Traceback" not in out


def test_usage_errors_answer_json_with_json():
    res = edgeml("serve", "x.edgepkg", "--port", "99999", "--json")
    assert res.returncode == 2
    err = json.loads(res.stdout)
    assert err["error"] == "UsageError" and "--port: 99999 is not a port" in err["message"]


def test_help_lists_exit_codes_and_environment():
    from edgeml.cli import EXIT_CODES

    text = edgeml("--help").stdout
    for code, what in EXIT_CODES:
        assert f"{code:>3}  {what}" in text
    for var in ("EDGEML_BROKER", "EDGEML_FLEET_DB", "EDGEML_DEVICE_ID", "EDGEML_TRUSTED_KEYS", "NO_COLOR"):
        assert var in text
    assert "_EDGEML_COMPLETE=bash_source" in text


def test_readme_exit_code_table_matches_help():
    from edgeml.cli import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    for code, _ in EXIT_CODES:
        assert f"| {code} |" in readme, f"README's exit-code table lacks {code}"


def test_log_format_json_and_durations_in_one_syntax(tmp_path, closed_port, art):
    res = edgeml("agent", "--broker", f"mqtt://127.0.0.1:{closed_port}", "--device-id", "d1", "--state-dir",
                 tmp_path / "a", "--allow-unsigned", "--port", "-1", "--connect-timeout", "500ms",
                 env={"EDGEML_LOG_FORMAT": "json"})
    assert res.returncode == 10
    first = json.loads(res.stderr.splitlines()[0])
    assert first["level"] == "warning" and "cannot connect" in first["event"]
    bad = edgeml("serve", art, "--max-delay-ms", "2x")
    assert bad.returncode == 2 and "--max-delay-ms: 2x is not a duration: write e.g. 250ms, 10s" in bad.stderr
    from edgeml.cli import DurationType

    assert DurationType("ms").convert("0.5s", None, None) == 500.0
    assert DurationType("ms").convert("3", None, None) == 3.0          # a bare number keeps the option's unit
    assert DurationType("s").convert("2m", None, None) == 120.0
    assert DurationType("s").convert("250ms", None, None) == 0.25


def test_trusted_keys_from_the_environment(tmp_path, art):
    """$EDGEML_TRUSTED_KEYS stands for --trusted-key (path-separated) in every command that takes one."""
    res = edgeml("inspect", art, env={"EDGEML_TRUSTED_KEYS": str(tmp_path / "nope.pub")})
    assert res.returncode == 7 and f"cannot read public key {tmp_path / 'nope.pub'}" in res.stderr
    from edgeml.runtime.signing import generate_keypair

    _, pub = generate_keypair(tmp_path / "k")
    res = edgeml("inspect", art, env={"EDGEML_TRUSTED_KEYS": str(pub)})
    assert res.returncode == 7 and "unsigned" in res.stderr      # the tiny artifact carries no signature


def test_no_color_and_no_escape_codes_anywhere():
    for env in ({}, {"NO_COLOR": "1"}):
        for args in (["--help"], ["fleet", "rollout", "start", "--help"], ["doctor"]):
            res = edgeml(*args, env=env)
            assert "\x1b[" not in res.stdout + res.stderr


def test_a_group_without_a_command_prints_its_help():
    for args in ([], ["fleet"], ["fleet", "rollout"]):
        res = edgeml(*args)
        assert res.returncode == 0 and res.stdout.startswith("Usage: ") and "error" not in res.stderr


def test_version_lists_backends():
    text = edgeml("--version").stdout
    for name in ("edgeml", "onnxruntime", "openvino", "apache-tvm", "python"):
        assert name in text


def test_verbose_flag_sets_the_log_level_of_every_command(tmp_path, closed_port):
    """``edgeml -q agent ...``: only warnings; ``-v``: debug lines too."""
    base = ["agent", "--broker", f"mqtt://127.0.0.1:{closed_port}", "--device-id", "d1", "--state-dir", tmp_path / "a",
            "--allow-unsigned", "--port", "-1", "--connect-timeout", "1s"]
    quiet = edgeml("-q", *base)
    verbose = edgeml("-v", *base)
    assert quiet.returncode == verbose.returncode == 10
    assert " info " not in quiet.stderr and " warning cannot connect" in quiet.stderr
    assert " debug " in verbose.stderr


def _walk(cmd, path):
    import click

    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                yield from _walk(sub, [*path, name])


def test_every_option_has_help_and_every_command_examples():
    import click

    from edgeml.cli import main

    missing_help, missing_examples = [], []
    for path, cmd in _walk(main, ["edgeml"]):
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip():
                missing_help.append(f"{' '.join(path)} {p.opts[0]}")
        if not isinstance(cmd, click.Group) and "Examples:" not in (cmd.epilog or ""):
            missing_examples.append(" ".join(path))
    assert not missing_help, f"options without help text: {missing_help}"
    assert not missing_examples, f"commands without an Examples section: {missing_examples}"
