"""The core commands through the real CLI entry point."""

import json
import subprocess
import sys

from click.testing import CliRunner

from edgeml.cli import main


def test_targets_json_lists_every_shipped_target_with_host_verdict():
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = {t["name"] for t in data["targets"]}
    assert {"x86_64", "x86_64-avx2", "x86_64-avx512-vnni", "aarch64-a72", "aarch64-a76",
            "jetson-orin", "nvidia-gpu", "intel-gpu"} <= names
    by_name = {t["name"]: t for t in data["targets"]}
    assert by_name["aarch64-a72"]["runs_on_host"] is (data["host_arch"] == "aarch64")


def test_targets_host_only_omits_targets_this_host_cannot_run():
    data = json.loads(CliRunner().invoke(main, ["targets", "--host", "--json"]).output)
    assert data["targets"] and all(t["runs_on_host"] for t in data["targets"])


def test_keygen_writes_private_key_0600_and_public_key(tmp_path):
    key = tmp_path / "signer.key"
    result = CliRunner().invoke(main, ["keygen", str(key), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "signer.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(info["key_id"]) == 16


def test_keygen_refuses_to_overwrite_and_changes_nothing(tmp_path):
    key = tmp_path / "signer.key"
    CliRunner().invoke(main, ["keygen", str(key)])
    before = key.read_bytes()
    result = CliRunner().invoke(main, ["keygen", str(key)])
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert key.read_bytes() == before


def test_inspect_of_a_missing_file_is_a_clean_error_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "inspect", str(tmp_path / "nope.edgepkg")],
                          capture_output=True, text=True)
    assert proc.returncode == 7
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
