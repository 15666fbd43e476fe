"""The device image: built by scripts/build_image.py, run with podman (serve, health check, SIGTERM), and its root
filesystem run under chroot. Slow the first time (debootstrap); later runs reuse ~/.cache/edgeml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeml.fleet.broker import free_port

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/edgeml-device:test-amd64"
# crun (podman's default here) fails on hosts with hybrid cgroups v1 and without CAP_SYS_RESOURCE
# ("setrlimit RLIMIT_NOFILE: Operation not permitted", "cgroups in hybrid mode not supported"); runc with
# explicit limits within the host's works there. Tried in this order.
RUN_VARIANTS = [[], ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]]

pytestmark = pytest.mark.slow


def need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("building the Debian base needs root (debootstrap, chroot)")
    missing = [pkg for tool, pkg in (("podman", "podman"), ("debootstrap", "debootstrap"), ("dpkg-deb", "dpkg"))
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing Debian packages: {' '.join(missing)} (apt-get install {' '.join(missing)} runc)")


@pytest.fixture(scope="module")
def image():
    need_root_tools()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_image.py"), "--tag", TAG, "--json"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    print(f"\ndevice image {result['image']}: {result['size_mb']} MB (goal <= {result['goal_mb']} MB)")
    yield result
    subprocess.run(["podman", "rmi", "-f", TAG], capture_output=True)


@pytest.fixture
def model_dir(tmp_path):
    from edgeml.fleet.testing import make_artifact

    models = tmp_path / "models"
    models.mkdir()
    make_artifact(models / "model.edgepkg")
    os.chmod(tmp_path, 0o755)     # the image's user (10001) reads the bind mount
    os.chmod(models, 0o755)
    os.chmod(models / "model.edgepkg", 0o644)
    return models


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing ready on port {port} after {timeout}s")


def infer(port: int) -> dict:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/tiny/infer", body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def podman_run_args() -> list[str]:
    errors = []
    for extra in RUN_VARIANTS:
        proc = subprocess.run(["podman", "run", "--rm", *extra, TAG, "--version"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode == 0:
            return extra
        errors.append(proc.stderr.strip()[-300:])
    pytest.skip("podman cannot run a container on this machine: " + " | ".join(errors))


def test_device_image_within_size_goal(image):
    assert image["kind"] == "device" and image["arch"] == "amd64"
    assert image["within_goal"], f"device image is {image['size_mb']} MB > {image['goal_mb']} MB"


def test_device_image_serves_and_stops_cleanly_on_sigterm(image, model_dir):
    extra = podman_run_args()
    port = free_port()
    volume = f"edgeml-test-state-{port}"
    cid = subprocess.run(["podman", "run", "-d", *extra, "--network", "host", "-e", f"EDGEML_HTTP_PORT={port}",
                          "-v", f"{model_dir}:/models:ro", "-v", f"{volume}:/var/lib/edgeml", TAG,
                          "serve", "--host", "127.0.0.1", "--port", str(port), "/models/model.edgepkg"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    try:
        wait_ready(port)
        assert infer(port)["outputs"][0]["shape"] == [1, 3]
        user = subprocess.run(["podman", "exec", cid, "python3", "-c", "import os; print(os.getuid())"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        assert user == "10001"
        health = subprocess.run(["podman", "healthcheck", "run", cid], capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        start = time.monotonic()
        subprocess.run(["podman", "stop", "-t", "20", cid], capture_output=True, timeout=60, check=True)
        assert time.monotonic() - start < 15, "SIGTERM did not stop the server; podman had to SIGKILL it"
        state = subprocess.run(["podman", "inspect", cid, "--format", "{{.State.ExitCode}}"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
        logs = subprocess.run(["podman", "logs", cid], capture_output=True, text=True, timeout=60)
        assert state == "0", logs.stdout + logs.stderr
        assert "server stopped" in logs.stdout + logs.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", cid], capture_output=True, timeout=60)
        subprocess.run(["podman", "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def test_device_rootfs_serves_under_chroot(image, model_dir, tmp_path):
    """The fallback where containers cannot run: the image's root filesystem, its entrypoint, as user 10001."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    cid = subprocess.run(["podman", "create", TAG], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    try:
        export = subprocess.Popen(["podman", "export", cid], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(rootfs)], stdin=export.stdout, check=True, timeout=300)
        assert export.wait(60) == 0
    finally:
        subprocess.run(["podman", "rm", "-f", cid], capture_output=True, timeout=60)
    shutil.copy(model_dir / "model.edgepkg", rootfs / "model.edgepkg")
    shutil.copy("/proc/cpuinfo", rootfs / "proc" / "cpuinfo")   # no /proc mount in a bare chroot
    os.chmod(rootfs / "model.edgepkg", 0o644)
    port = free_port()
    env = {"PYTHONPATH": "/opt/edgeml/site", "HOME": "/var/lib/edgeml", "PATH": "/usr/bin:/bin"}
    chroot = shutil.which("chroot")
    assert chroot, "chroot is missing (Debian package coreutils)"
    proc = subprocess.Popen([chroot, "--userspec=10001:10001", str(rootfs), "python3", "-m", "edgeml.cli", "serve",
                             "--host", "127.0.0.1", "--port", str(port), "/model.edgepkg"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(port)
        assert infer(port)["model_name"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
