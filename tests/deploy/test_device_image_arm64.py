"""The arm64 device image: built on this amd64 host (no RUN step, no emulation), its root filesystem then
runs the entrypoint and the image's HEALTHCHECK under qemu-user (Cortex-A72). Reuses ~/.cache/edgeml."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from edgeml.fleet.broker import free_port

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/edgeml-device:test-arm64"

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


@pytest.fixture(scope="module")
def arm64_rootfs(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("building the Debian base needs root (debootstrap)")
    missing = [pkg for tool, pkg in (("podman", "podman"), ("debootstrap", "debootstrap"),
                                     ("qemu-aarch64-static", "qemu-user-static")) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing Debian packages: {' '.join(missing)}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_image.py"), "--arch", "arm64", "--tag", TAG,
                           "--json"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    print(f"\narm64 device image {result['image']}: {result['size_mb']} MB (goal <= {result['goal_mb']} MB)")
    rootfs = tmp_path_factory.mktemp("arm64") / "rootfs"
    rootfs.mkdir()
    cid = subprocess.run(["podman", "create", "--platform", "linux/arm64", TAG], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    try:
        export = subprocess.Popen(["podman", "export", cid], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(rootfs)], stdin=export.stdout, check=True, timeout=300)
        assert export.wait(60) == 0
    finally:
        subprocess.run(["podman", "rm", "-f", cid], capture_output=True, timeout=60)
        subprocess.run(["podman", "rmi", "-f", TAG], capture_output=True, timeout=60)
    # onnxruntime needs a believable /proc/cpuinfo under qemu: the aarch64 proof's writer, reused
    spec = importlib.util.spec_from_file_location("aarch64_proof", REPO / "scripts" / "aarch64_proof.py")
    assert spec is not None and spec.loader is not None
    proof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proof)
    proof.write_cpuinfo(rootfs, "cortex-a72")
    return rootfs, result


def aarch64_artifact(dest: Path) -> Path:
    """The fleet tests' tiny model, declared for the aarch64-a72 target (ONNX files are portable)."""
    from edgeml.fleet.testing import make_artifact
    from edgeml.runtime.artifact import write_artifact

    x86 = make_artifact(dest.with_suffix(".x86.edgepkg"))
    with zipfile.ZipFile(x86) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        files = {name: zf.read(name) for name in zf.namelist() if name != "manifest.json"}
    manifest.update(target="aarch64-a72", arch="aarch64")
    manifest.pop("files", None)
    return write_artifact(dest, manifest, files)


def emulated(rootfs: Path, *argv: str) -> list[str]:
    return ["qemu-aarch64-static", "-L", str(rootfs), str(rootfs / "usr/bin/python3.11"), *argv]


def test_arm64_image_is_arm64_and_within_goal(arm64_rootfs):
    rootfs, result = arm64_rootfs
    assert result["arch"] == "arm64" and result["within_goal"], result
    header = (rootfs / "usr/bin/python3.11").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183   # EM_AARCH64


def test_arm64_rootfs_serves_and_passes_its_healthcheck_under_qemu(arm64_rootfs, tmp_path):
    rootfs, _ = arm64_rootfs
    artifact = aarch64_artifact(tmp_path / "model.edgepkg")
    port = free_port()
    env = {"PYTHONPATH": str(rootfs / "opt/edgeml/site"), "HOME": str(tmp_path), "QEMU_CPU": "cortex-a72",
           "EDGEML_HTTP_PORT": str(port), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen(emulated(rootfs, "-m", "edgeml.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                     str(artifact)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)   # not the checkout: `-m` puts the cwd first on sys.path
    try:
        health = None
        deadline = time.monotonic() + 180          # emulated imports of numpy + onnxruntime are slow
        while time.monotonic() < deadline and proc.poll() is None:
            health = subprocess.run(emulated(rootfs, str(rootfs / "opt/edgeml/healthcheck.py")), env=env,
                                    capture_output=True, text=True, timeout=120)
            if health.returncode == 0:
                break
            time.sleep(1)
        assert health is not None and health.returncode == 0, (health.stderr if health else "") + \
            (proc.stdout.read() if proc.poll() is not None and proc.stdout else "")
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/tiny/infer", body.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["outputs"][0]["shape"] == [1, 3]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
