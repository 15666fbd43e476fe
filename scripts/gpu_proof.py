#!/usr/bin/env python3
"""GPU proof for TVM CUDA artifacts (see scripts/gpu_proof.sh for the two-step use).

``prepare`` (here, no GPU needed) writes DIR (default .gpu_proof/, git-ignored):
  artifacts/*.edgepkg  TVM artifacts for the ``nvidia-gpu`` target (CUDA, DLight schedules)
  ref/*.npz            inputs and the x86 ONNX Runtime FP32 reference outputs
  site/                a runtime-only TVM for CPython 3.12 x86_64 (the GPU machine's python3):
                       the apache-tvm and apache-tvm-ffi wheels without the compiler library
  edgeml-src/          edgeml's runtime as source (edgeml, edgeml.runtime, edgeml.targets)

``run`` (on the GPU machine) loads each artifact with ``edgeml.load`` in ONE
process, compares with the reference (rtol 1e-3, atol 1e-4), prints p50 latency,
and exits 0 only when every model matched. CUDA kernels ship as source in TVM
0.27; the runtime compiles them at load with NVRTC (cuda-bindings) or nvcc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TVM_WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0"]
DROP = ("tvm/lib/libtvm_compiler.so", "tvm/include/", "tvm/src/", "tvm/3rdparty/", "tvm/web/")
RTOL, ATOL = 1e-3, 1e-4


def prepare(args) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    import numpy as np
    import onnxruntime as ort

    from aarch64_proof import edgeml_runtime_tree, model_paths, sample_inputs
    from tvm_artifacts import compile_artifact

    out = Path(args.dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "artifacts").mkdir(parents=True)
    (out / "ref").mkdir()
    work = out / "work"
    work.mkdir()
    for name, onnx_path in model_paths(args.models.split(","), work).items():
        feeds = sample_inputs(onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        np.savez(out / "ref" / f"{name}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                 **{f"out:{k}": v for k, v in ref.items()})
        compile_artifact(onnx_path, args.target, "tvm", out / "artifacts" / f"{name}.edgepkg",
                         workdir=work / f"build-{name}", builder=args.builder)
    shutil.rmtree(work)
    edgeml_runtime_tree(out / "edgeml-src")
    wheels = out / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp", "-d", str(wheels)]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                     "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", platform]
    subprocess.run(cmd + TVM_WHEELS, check=True)
    site = out / "site"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if any(member.startswith(d) for d in DROP):
                    continue
                zf.extract(member, site)
    shutil.rmtree(wheels)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepared {out} ({size / 2**20:.1f} MiB): {sorted(p.name for p in (out / 'artifacts').iterdir())}")
    if size > 60 * 2**20:
        print("warning: over 60 MiB; the device tool carries at most 64 MiB with the working tree", file=sys.stderr)
    return 0


def run(args) -> int:
    out = Path(args.dir).resolve()
    sys.path[:0] = [str(out / "site"), str(out / "edgeml-src")]
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import numpy as np

    import edgeml

    from edgeml.targets import host_features

    print(json.dumps({"host_detects_cuda": "cuda" in host_features()}), flush=True)
    failed = 0
    results = []
    for artifact in sorted((out / "artifacts").glob("*.edgepkg")):
        name = artifact.stem
        with np.load(out / "ref" / f"{name}.npz") as data:
            feeds = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
            ref = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
        entry = {"model": name}
        try:
            t = time.perf_counter()
            # the GPU is checked by TVM itself (device.exist); host_features() is reported above
            model = edgeml.load(artifact, cache_dir=out / "extract", check_host=False)
            entry["load_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            got = model.predict(feeds)
            entry["first_predict_s"] = round(time.perf_counter() - t, 2)  # includes the NVRTC compile
            times = []
            for _ in range(20):
                t = time.perf_counter()
                model.predict(feeds)
                times.append(time.perf_counter() - t)
            entry["p50_ms"] = round(sorted(times)[10] * 1000, 3)
            worst = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) for k, v in ref.items())
            entry["max_abs_error"] = worst
            entry["ok"] = all(np.allclose(got[k], v, rtol=RTOL, atol=ATOL) for k, v in ref.items())
        except Exception as exc:  # report every model, then fail
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
        failed += not entry["ok"]
        results.append(entry)
        print(json.dumps(entry), flush=True)
    print(f"gpu proof: {len(results) - failed} passed, {failed} failed")
    return 0 if results and not failed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="TVM CUDA artifacts: prepare here, run on a GPU machine")
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--dir", default=str(REPO / ".gpu_proof"))
    parser.add_argument("--models", default="tiny,digits,mobilenetv2")
    parser.add_argument("--target", default="nvidia-gpu")
    parser.add_argument("--python-version", default="3.12", help="CPython of the GPU machine (its python3)")
    parser.add_argument("--builder", choices=["auto", "pipeline", "direct"], default="direct")
    args = parser.parse_args()
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
