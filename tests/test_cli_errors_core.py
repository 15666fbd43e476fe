"""User mistakes on the core commands (issue 9 row 13, issue 12 item 6): one clear error, no traceback,
nothing half-written on disk. Each case runs the real CLI (CliRunner or a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeml.cli import COMMANDS, main

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from serve_models import MLP_INPUTS, MLP_OUTPUTS, mlp_onnx, write_onnx_artifact  # noqa: E402


def _cli(*args: str, cwd: Path | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


@pytest.fixture
def mlp_run_files(tmp_path: Path) -> tuple[Path, Path]:
    artifact = write_onnx_artifact(tmp_path / "mlp.edgepkg", mlp_onnx(), name="mlp", version="1",
                                   inputs=MLP_INPUTS, outputs=MLP_OUTPUTS)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.ones((2, 30), np.float32))
    return artifact, inputs


# ---- keygen ---------------------------------------------------------------------------------------------

def test_keygen_empty_path_is_a_usage_error_not_a_traceback(tmp_path):
    proc = _cli("keygen", "", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "KEY: '' is not a file path" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_keygen_refuses_a_missing_parent_folder_and_creates_nothing(tmp_path):
    key = tmp_path / "no" / "such" / "signer.key"
    result = CliRunner().invoke(main, ["keygen", str(key)])
    assert result.exit_code == 2, result.output
    assert f"folder {key.parent} does not exist" in result.output
    assert not (tmp_path / "no").exists()


def test_keygen_refuses_a_folder_as_key_path(tmp_path):
    result = CliRunner().invoke(main, ["keygen", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder" in result.output


def test_keygen_refuses_existing_public_half_without_force_and_keeps_it(tmp_path):
    key = tmp_path / "k"
    (tmp_path / "k.pub").write_text("keep me")
    result = CliRunner().invoke(main, ["keygen", str(key)])
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output
    assert (tmp_path / "k.pub").read_text() == "keep me" and not key.exists()


def test_keygen_force_overwrites_both_halves(tmp_path):
    key = tmp_path / "k"
    first = json.loads(CliRunner().invoke(main, ["keygen", str(key), "--json"]).output)
    second = CliRunner().invoke(main, ["keygen", str(key), "--force", "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["key_id"] != first["key_id"]


def test_keygen_into_proc_is_refused_cleanly_even_with_force():
    proc = _cli("keygen", "/proc/version", "--force")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot create files in folder /proc" in proc.stderr


# ---- run --output -------------------------------------------------------------------------------------

def test_run_output_to_proc_version_is_one_clear_error(mlp_run_files, tmp_path):
    artifact, inputs = mlp_run_files
    proc = _cli("run", str(artifact), "--input", str(inputs), "--output", "/proc/version",
                env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "--output" in proc.stderr and "/proc" in proc.stderr


@pytest.mark.parametrize("case", ["folder", "missing_parent", "empty", "fifo"])
def test_run_output_bad_paths_are_refused_before_running(mlp_run_files, tmp_path, monkeypatch, case):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    artifact, inputs = mlp_run_files
    target = {"folder": str(tmp_path), "missing_parent": str(tmp_path / "nope" / "out.npz"), "empty": "",
              "fifo": str(tmp_path / "pipe")}[case]
    if case == "fifo":
        os.mkfifo(target)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["run", str(artifact), "--input", str(inputs), "--output", target])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "--output" in result.output
    assert "probs: shape" not in result.output  # refused before the model ran
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp left


def test_run_output_writes_atomically_and_leaves_no_temp(mlp_run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    artifact, inputs = mlp_run_files
    out = tmp_path / "out.npz"
    result = CliRunner().invoke(main, ["run", str(artifact), "--input", str(inputs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        assert data["probs"].shape == (2, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.npz.")]


def test_run_input_that_cannot_be_cast_is_a_data_error(mlp_run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    artifact, _ = mlp_run_files
    bad = tmp_path / "strings.npz"
    np.savez(bad, x=np.array([["a"] * 30] * 2))
    result = CliRunner().invoke(main, ["run", str(artifact), "--input", str(bad)])
    assert result.exit_code == 5, result.output
    assert "array 'x'" in result.output and "cannot be read as float32" in result.output


# ---- a command whose module cannot be imported (issue 12 item 6) ------------------------------------------

def test_unavailable_command_prints_its_reason_not_a_name_error(monkeypatch):
    monkeypatch.setitem(COMMANDS._paths, "broken", "edgeml_no_such_module_for_test:cmd")
    result = CliRunner().invoke(main, ["broken", "--some-option", "x"])
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, NameError)
    assert "command 'broken' is unavailable here" in result.output
    assert "edgeml_no_such_module_for_test" in result.output
    helped = CliRunner().invoke(main, ["--help"])
    assert "broken" in helped.output and "unavailable" in helped.output


def test_compile_output_in_a_missing_folder_is_refused_before_compiling(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx())
    result = CliRunner().invoke(main, ["compile", str(model), "-t", "x86_64", "-o", str(tmp_path / "no" / "m.edgepkg")])
    assert result.exit_code == 2, result.output
    assert f"folder {tmp_path / 'no'} does not exist" in result.output
    assert not (tmp_path / "no").exists()
