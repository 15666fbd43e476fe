"""The quick starts run as written: every ```bash block of docs/quickstart-fleet.md and of the README's
"Try it in five minutes", in order, as one bash script (set -euo pipefail), so the docs cannot rot.

The only edits are the addresses: the documented ports and the broker's 127.0.0.1:1883 are swapped for free
loopback ports (a real Mosquitto this test starts), so the test never meets a service already running there.
The script runs in a temporary folder holding the repository's examples/ and a stand-in .venv/bin/activate
that puts this interpreter's ``edgeml`` and ``python`` first on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeml.fleet.broker import Broker, free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[2]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def readme_five_minutes() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Try it in five minutes")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def sandbox(tmp_path: Path) -> Path:
    """A working folder with examples/ and a .venv/bin/activate that points at this interpreter."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    shims = work / ".venv" / "bin"
    shims.mkdir(parents=True)
    (shims / "edgeml").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edgeml.cli "$@"\n')
    (shims / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for shim in ("edgeml", "python"):
        (shims / shim).chmod(0o755)
    (shims / "activate").write_text(f'export PATH="{shims}:$PATH"\n')
    return work


def run_script(script: str, work: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    env["HOME"] = str(work)      # a fresh compile cache: the docs must work on a first run
    proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = ""
        pytest.fail(f"the quick start did not finish within {timeout}s")
    finally:
        try:     # whatever the script left running (it backgrounds the manager and agents) ends with it
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def logs(work: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(work.glob("qs/*.log")))


@pytest.mark.mqtt
@pytest.mark.slow
def test_fleet_quickstart_runs_as_written(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    if not shutil.which("curl"):
        pytest.skip("curl is not installed: the quick start's request uses it")
    blocks = bash_blocks((REPO / "docs" / "quickstart-fleet.md").read_text())
    assert len(blocks) >= 6, "the quick start's steps are ```bash blocks"
    script = "\n".join(blocks)
    for literal in ("8765", "8101", "8102", "127.0.0.1:1883"):
        assert literal in script, f"the quick start no longer uses {literal}: update this test's address swap"
    broker = Broker(tmp_path / "mosquitto", kind="mosquitto").start()
    try:
        script = script.replace("mqtt://127.0.0.1:1883", broker.url)
        for port in ("8765", "8101", "8102"):
            script = script.replace(port, str(free_port()))
        work = sandbox(tmp_path)
        res = run_script(script, work, timeout=240)
    finally:
        broker.stop()
    assert res.returncode == 0, res.stdout[-6000:] + logs(work)
    out = res.stdout
    assert "published digits-cnn@1.0.0" in out and "signed" in out
    assert "rollout 1 (digits-cnn@1.0.0) completed" in out, out[-4000:]
    assert re.search(r"cam-1\s+yes\s+digits-cnn@1\.0\.0", out) and re.search(r"cam-2\s+yes\s+digits-cnn@1\.0\.0", out)
    answer = out[out.rindex('{"model_name"'):] if '{"model_name"' in out else out[-2000:]
    assert '"model_name":"digits-cnn"' in answer.replace(" ", ""), answer
    import json

    logits = json.loads(answer.splitlines()[0])["outputs"][0]["data"]
    assert max(range(10), key=lambda i: logits[i]) == 1, "the first sample image is a handwritten 1"


@pytest.mark.slow
def test_readme_five_minutes_runs_as_written(tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed: the README's request uses it")
    blocks = bash_blocks(readme_five_minutes())
    assert blocks, "README 'Try it in five minutes' has ```bash blocks"
    script = "\n".join(blocks)
    assert "8000" in script and "edgeml fleet demo" in script
    script = script.replace("8000", str(free_port()))
    # the demo is the last step; it is tested on its own (tests/fleet/test_fleet_cli.py) and takes a minute:
    # here it only has to start and name its scenario, so --help stands in for the run
    script = script.replace("edgeml fleet demo", "edgeml fleet demo --help")
    work = sandbox(tmp_path)
    res = run_script(script, work, timeout=240)
    assert res.returncode == 0, res.stdout[-6000:]
    out = res.stdout
    assert "wrote digits.edgepkg" in out and "digits-cnn 1.0.0" in out
    assert '"model_name":"digits-cnn"' in out.replace(" ", "")
    assert "top class" in out
