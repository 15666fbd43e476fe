#!/usr/bin/env python3
"""Prove that aarch64 artifacts run: an arm64 Debian root filesystem under qemu-user.

    python scripts/aarch64_proof.py --cache ~/.cache/edgeml/aarch64-proof [--models tiny,digits,mobilenetv2]

Steps (each cached in --cache, so a second run only compiles and runs):

1. ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm``
   from this machine's configured Debian mirror; the downloaded .debs are
   unpacked with ``dpkg-deb -x`` (no emulated second stage),
2. aarch64 wheels (numpy, onnxruntime, apache-tvm, apache-tvm-ffi) are installed
   on the host with ``pip --platform manylinux_2_28_aarch64 --target SITE``,
3. ROOTFS/proc/cpuinfo becomes a plain file describing a 4-core Cortex-A72
   (onnxruntime segfaults at import under qemu without it),
4. for each model: the x86 FP32 reference (ONNX Runtime), a TVM artifact and an
   ONNX Runtime artifact for the target (``aarch64-a72`` by default),
5. ONE emulated Python process (``QEMU_CPU=cortex-a72 qemu-aarch64-static -L
   ROOTFS ROOTFS/usr/bin/python3.11``, edgeml's runtime source on PYTHONPATH)
   runs ``edgeml.load(...).predict`` for every artifact; outputs are compared
   with the reference (rtol 1e-3, atol 1e-4).

Exit codes: 0 all matched, 1 a mismatch or a failed run, 3 a tool is missing
(qemu-aarch64-static, debootstrap, dpkg-deb or the cross compiler).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITE = "bookworm"
PYTHON = "python3.11"
WHEELS = ["numpy", "onnxruntime", "apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0"]
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
RTOL, ATOL = 1e-3, 1e-4
EXIT_MISSING = 3

CPU_PARTS = {"cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),
             "cortex-a76": ("0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                     "asimdrdm lrcpc dcpop asimddp")}

DRIVER = r'''
import json, sys, time, platform
import numpy as np
t0 = time.time()
import edgeml
jobs = json.loads(sys.argv[1])
results = {"machine": platform.machine(), "import_s": time.time() - t0, "runs": []}
for job in jobs:
    entry = {"name": job["name"]}
    try:
        t = time.time()
        model = edgeml.load(job["artifact"], cache_dir=job["cache"])
        entry["load_s"] = time.time() - t
        with np.load(job["inputs"]) as data:
            feeds = {k: data[k] for k in data.files}
        t = time.time()
        out = model.predict(feeds)
        entry["first_predict_s"] = time.time() - t
        t = time.time()
        model.predict(feeds)
        entry["predict_s"] = time.time() - t
        np.savez(job["outputs"], **out)
        entry["backend"] = model.backend_name
        entry["ok"] = True
    except Exception as exc:
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
    results["runs"].append(entry)
    print(json.dumps(entry), flush=True)
print("RESULTS " + json.dumps(results), flush=True)
'''


class Missing(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def check_tools(target) -> None:
    missing = [tool for tool in ("qemu-aarch64-static", "debootstrap", "dpkg-deb") if not shutil.which(tool)]
    if target.cross_compiler and not shutil.which(target.cross_compiler):
        missing.append(target.cross_compiler)
    if missing:
        raise Missing(f"missing tools: {', '.join(missing)} "
                      "(apt-get install qemu-user-static debootstrap gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    if os.geteuid() != 0:
        raise Missing("debootstrap needs root to build the arm64 root filesystem")


def debian_mirror() -> str:
    """The first Debian mirror this machine's apt is configured with."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"^URIs:\s*(\S+)", line) or re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line)
            if m and "security" not in m.group(1) and m.group(1).startswith("http"):
                return m.group(1)
    return "http://deb.debian.org/debian"


def build_rootfs(cache: Path) -> Path:
    rootfs = cache / f"rootfs-{SUITE}-arm64"
    if (rootfs / ".edgeml-rootfs-ok").exists():
        log(f"rootfs: cached {rootfs}")
        return rootfs
    tmp = cache / f"rootfs-{SUITE}-arm64.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = debian_mirror()
    log(f"rootfs: debootstrap --foreign arm64 {SUITE} from {mirror}")
    start = time.time()
    proc = subprocess.run(
        ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, str(tmp), mirror],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    if not (tmp / "usr/bin" / PYTHON).exists():
        raise RuntimeError(f"the arm64 rootfs has no /usr/bin/{PYTHON} after unpacking {len(debs)} packages")
    for deb in debs:
        deb.unlink()
    (tmp / ".edgeml-rootfs-ok").write_text(f"{SUITE} {mirror}\n")
    tmp.rename(rootfs)
    log(f"rootfs: {len(debs)} packages unpacked in {time.time() - start:.0f}s")
    return rootfs


def install_wheels(cache: Path) -> Path:
    key = hashlib.sha256(" ".join(WHEELS + PLATFORMS).encode()).hexdigest()[:12]
    site = cache / f"site-cp311-aarch64-{key}"
    if (site / ".edgeml-site-ok").exists():
        log(f"wheels: cached {site}")
        return site
    tmp = Path(str(site) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--target", str(tmp)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    log("wheels: pip install (aarch64) " + " ".join(WHEELS))
    start = time.time()
    proc = subprocess.run(cmd + WHEELS, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "tvm").is_dir():
        raise RuntimeError(f"pip could not install aarch64 wheels:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    (tmp / ".edgeml-site-ok").write_text(" ".join(WHEELS) + "\n")
    tmp.rename(site)
    log(f"wheels: installed in {time.time() - start:.0f}s")
    return site


def write_cpuinfo(rootfs: Path, cpu: str, cores: int = 4) -> None:
    part, features = CPU_PARTS.get(cpu, CPU_PARTS["cortex-a72"])
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n"
        for i in range(cores)
    ]
    proc = rootfs / "proc"
    proc.mkdir(exist_ok=True)
    cpuinfo = proc / "cpuinfo"
    if cpuinfo.is_symlink() or cpuinfo.is_dir():
        raise RuntimeError(f"{cpuinfo} must be a plain file")
    cpuinfo.write_text("\n".join(blocks) + "\n")


def edgeml_runtime_tree(dest: Path) -> Path:
    """edgeml's runtime as importable source: edgeml/, edgeml/runtime, edgeml/targets, edgeml/backends (no compiler)."""
    pkg = dest / "edgeml"
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "server")
    shutil.copytree(REPO / "edgeml", pkg, ignore=ignore)
    shutil.copytree(REPO / "runtime", pkg / "runtime", ignore=ignore)
    shutil.copytree(REPO / "targets", pkg / "targets", ignore=ignore)
    shutil.copytree(REPO / "backends", pkg / "backends", ignore=ignore)   # run sides (build sides unused there)
    return dest


def model_paths(names: list[str], work: Path) -> dict[str, Path]:
    from tvm_artifacts import tiny_cnn_onnx

    out: dict[str, Path] = {}
    for name in names:
        if name == "tiny":
            out[name] = tiny_cnn_onnx(work / "tiny.onnx")
        elif name == "digits":
            path = REPO / "examples" / "digits" / "digits.onnx"
            if not path.exists():
                raise RuntimeError(f"{path} does not exist (run examples/digits/train.py)")
            out[name] = path
        elif name in ("mobilenetv2", "resnet18"):
            path = work / f"{name}.onnx"
            proc = subprocess.run([sys.executable, "-m", "edgeml.benchmarks.models", name, str(path)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"could not build {name}: {proc.stderr[-1500:]}")
            out[name] = path
        elif name.endswith(".onnx"):
            out[Path(name).stem] = Path(name)
        else:
            raise RuntimeError(f"unknown model {name!r}: use tiny, digits, mobilenetv2, resnet18 or a .onnx path")
    return out


def sample_inputs(onnx_path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    from tvm_artifacts import onnx_io

    inputs, _ = onnx_io(onnx_path)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = [2 if (d is None and i == 0) else (d or 1) for i, d in enumerate(spec.shape)]
        feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def run(args) -> int:
    from edgeml.targets import get_target
    from tvm_artifacts import compile_artifact

    target = get_target(args.target)
    if target.arch != "aarch64":
        raise RuntimeError(f"target {target.name} is not an aarch64 target")
    check_tools(target)
    cache = Path(args.cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rootfs = build_rootfs(cache)
    site = install_wheels(cache)
    cpu = target.qemu_cpu or "cortex-a72"
    write_cpuinfo(rootfs, cpu)
    work = Path(tempfile.mkdtemp(prefix="aarch64-proof-", dir=args.workdir))
    try:
        src = edgeml_runtime_tree(work / "edgeml-src")
        jobs, refs = [], {}
        for name, onnx_path in model_paths(args.models.split(","), work).items():
            import onnxruntime as ort

            feeds = sample_inputs(onnx_path)
            inputs_npz = work / f"{name}-inputs.npz"
            np.savez(inputs_npz, **feeds)
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            refs[name] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            for backend in args.backends.split(","):
                artifact = work / f"{name}-{backend}-{target.name}.edgepkg"
                compile_artifact(onnx_path, target.name, backend, artifact, workdir=work / f"build-{name}-{backend}",
                                 log=log, builder=args.builder)
                jobs.append({"name": f"{name}/{backend}", "model": name, "artifact": str(artifact),
                             "inputs": str(inputs_npz), "outputs": str(work / f"{name}-{backend}-out.npz"),
                             "cache": str(work / "extract")})
        driver = work / "driver.py"
        driver.write_text(DRIVER)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8",
               "PYTHONPATH": f"{site}:{src}", "QEMU_CPU": cpu, "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "2"}
        cmd = ["qemu-aarch64-static", "-L", str(rootfs), str(rootfs / "usr/bin" / PYTHON), str(driver), json.dumps(jobs)]
        log(f"qemu: QEMU_CPU={cpu} running {len(jobs)} artifacts in one emulated process")
        t = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        log(f"qemu: finished in {time.time() - t:.0f}s (exit {proc.returncode})")
        line = next((text for text in proc.stdout.splitlines() if text.startswith("RESULTS ")), None)
        if proc.returncode != 0 or line is None:
            log(proc.stdout[-3000:])
            log(proc.stderr[-3000:])
            return 1
        results = json.loads(line[len("RESULTS "):])
        failed = 0
        report = {"target": target.name, "qemu_cpu": cpu, "machine": results["machine"],
                  "import_s": round(results["import_s"], 1), "runs": []}
        for job, run_ in zip(jobs, results["runs"]):
            entry = {"name": job["name"], "ok": run_["ok"]}
            if run_["ok"]:
                with np.load(job["outputs"]) as data:
                    got = {k: data[k] for k in data.files}
                worst = 0.0
                for out_name, want in refs[job["model"]].items():
                    have = got.get(out_name)
                    if have is None or have.shape != want.shape:
                        entry["ok"] = False
                        entry["error"] = f"output {out_name}: {None if have is None else have.shape} vs {want.shape}"
                        break
                    worst = max(worst, float(np.max(np.abs(have.astype(np.float64) - want))))
                    if not np.allclose(have, want, rtol=RTOL, atol=ATOL):
                        entry["ok"] = False
                        entry["error"] = f"output {out_name} differs from the x86 FP32 reference"
                entry.update(max_abs_error=worst, load_s=round(run_["load_s"], 2),
                             predict_s=round(run_["predict_s"], 3), backend=run_["backend"])
            else:
                entry["error"] = run_.get("error")
            failed += not entry["ok"]
            report["runs"].append(entry)
            log(f"  {'PASS' if entry['ok'] else 'FAIL'} {job['name']:<28} "
                + (f"max|err| {entry['max_abs_error']:.2e}  load {entry['load_s']}s  predict {entry['predict_s']}s"
                   if "max_abs_error" in entry else str(entry.get("error"))))
        report["seconds"] = round(time.time() - started, 1)
        report["passed"] = failed == 0
        if args.json:
            print(json.dumps(report, indent=2))
        log(f"aarch64 proof on {results['machine']} (QEMU_CPU={cpu}): "
            f"{len(jobs) - failed} passed, {failed} failed in {report['seconds']}s")
        return 0 if failed == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgeml" / "aarch64-proof"),
                        help="folder for the rootfs and wheels (reused)")
    parser.add_argument("--models", default="tiny,digits", help="tiny, digits, mobilenetv2, resnet18 or .onnx paths")
    parser.add_argument("--backends", default="tvm,onnxruntime")
    parser.add_argument("--target", default="aarch64-a72")
    parser.add_argument("--workdir", default=None, help="parent of the temporary work folder")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for the emulated run")
    parser.add_argument("--builder", choices=["auto", "pipeline", "direct"], default="auto",
                        help="edgeml.compile (pipeline), the backends directly, or pipeline when importable")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Missing as exc:
        print(f"aarch64 proof cannot run here: {exc}", file=sys.stderr)
        return EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
