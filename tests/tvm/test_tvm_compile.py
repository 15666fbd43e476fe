"""TVM backend: Relax build for the host, cross builds, runtime loading and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeml.backends.tvm.build import TvmCompiler, library_arch, parse_budget
from edgeml.errors import BackendError, CompileError, UnsupportedHost, UnsupportedOp, UsageError

REPO = Path(__file__).resolve().parents[2]


def test_host_artifact_matches_onnxruntime(x86_artifact, sample_inputs, ort_reference, tmp_path):
    import edgeml

    model = edgeml.load(x86_artifact, cache_dir=tmp_path / "cache")
    assert model.backend_name == "tvm"
    got = model.predict(sample_inputs)["logits"]
    np.testing.assert_allclose(got, ort_reference, rtol=1e-3, atol=1e-5)
    # dynamic batch: a single sample runs too
    one = model.predict({"x": sample_inputs["x"][:1]})["logits"]
    np.testing.assert_allclose(one, ort_reference[:1], rtol=1e-3, atol=1e-5)


def test_manifest_says_untuned_and_what_tuning_costs(x86_artifact):
    from edgeml.runtime.artifact import read_manifest

    manifest = read_manifest(x86_artifact)
    options = manifest["backend"]["options"]
    assert manifest["backend"]["entrypoint"] == "model/model.so"
    assert set(manifest["files"]) == {"model/model.so", "model/params.bin"}
    assert options["tuned"] is False and options["library_arch"] == "x86_64"
    recipe = manifest["quantization"]
    assert recipe["tuned"] is False and recipe["trials"] == 0
    assert recipe["tuning_estimate"]["tasks"] > 0 and recipe["tuning_estimate"]["seconds"] > 0
    notes = " ".join(manifest["candidates"][0]["notes"])
    assert "untuned" in notes and "slower than ONNX Runtime" in notes


def test_device_side_imports_only_the_tvm_runtime(x86_artifact, tmp_path):
    """A fresh process loads the artifact with TVM in runtime-only mode: no compiler, no Relax, no torch."""
    code = (
        "import sys, json, numpy as np, edgeml\n"
        f"m = edgeml.load({str(x86_artifact)!r}, cache_dir={str(tmp_path / 'c')!r})\n"
        "y = m.predict({'x': np.zeros((2, 1, 8, 8), np.float32)})['logits']\n"
        "import tvm\n"
        "import os\n"
        "print(json.dumps({'runtime_only': bool(tvm.base._RUNTIME_ONLY), 'relax': 'tvm.relax' in sys.modules,\n"
        "  'env_left': 'TVM_USE_RUNTIME_LIB' in os.environ,\n"
        "  'torch': 'torch' in sys.modules, 'compiler': 'edgeml.compiler' in sys.modules, 'shape': list(y.shape)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB", "EDGEML_TVM_RUNTIME_ONLY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"runtime_only": True, "relax": False, "torch": False, "compiler": False, "shape": [2, 10],
                     "env_left": False}


def test_compiling_after_a_runtime_only_load_says_what_to_do(x86_artifact, tiny_onnx, tmp_path, require_cross_compiler):
    require_cross_compiler("aarch64-a72")
    code = (
        "import sys, edgeml\n"
        f"edgeml.load({str(x86_artifact)!r}, cache_dir={str(tmp_path / 'c')!r})\n"
        "sys.path.insert(0, 'scripts')\n"
        "from tvm_artifacts import build_tvm_artifact\n"
        "from edgeml.errors import CompileError\n"
        "try:\n"
        f"    build_tvm_artifact({str(tiny_onnx)!r}, 'aarch64-a72', {str(tmp_path / 'x.edgepkg')!r})\n"
        "except CompileError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB", "EDGEML_TVM_RUNTIME_ONLY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert "REFUSED" in out.stdout, out.stderr[-2000:]
    assert "EDGEML_TVM_RUNTIME_ONLY=0" in out.stdout
    assert not (tmp_path / "x.edgepkg").exists()


@pytest.mark.parametrize(
    "target, arch, marker",
    [
        ("aarch64-a72", "aarch64", None),
        ("nvidia-gpu", "x86_64", b"__global__"),
        ("jetson-orin", "aarch64", b"__global__"),
        ("mali-opencl", "aarch64", b"__kernel"),
    ],
)
def test_cross_and_gpu_artifacts_build_without_the_device(tiny_onnx, tmp_path, target, arch, marker, require_cross_compiler):
    from tvm_artifacts import build_tvm_artifact

    from edgeml.runtime.artifact import read_manifest

    require_cross_compiler(target)
    path = build_tvm_artifact(tiny_onnx, target, tmp_path / f"{target}.edgepkg")
    manifest = read_manifest(path)
    assert manifest["target"] == target and manifest["arch"] == arch
    with zipfile.ZipFile(path) as zf:
        library = zf.read("model/model.so")
        assert len(zf.read("model/params.bin")) > 1000
    lib_file = tmp_path / "model.so"
    lib_file.write_bytes(library)
    assert library_arch(lib_file) == arch, "the shared library is built for the target's CPU"
    if marker:
        assert marker in library, "the GPU kernels travel inside the library"
    assert manifest["backend"]["options"]["device"] == {"aarch64-a72": "cpu", "mali-opencl": "opencl"}.get(target, "cuda")
    notes = " ".join(manifest["candidates"][0]["notes"])
    assert ("DLight" in notes) == (target != "aarch64-a72")


def test_aarch64_artifact_is_refused_on_x86(tiny_onnx, tmp_path, require_cross_compiler):
    import edgeml
    from edgeml.targets import host_arch
    from tvm_artifacts import build_tvm_artifact

    if host_arch() != "x86_64":
        pytest.skip(f"this check needs an x86_64 host; this one is {host_arch()}")
    require_cross_compiler("aarch64-a72")
    path = build_tvm_artifact(tiny_onnx, "aarch64-a72", tmp_path / "arm.edgepkg")
    with pytest.raises(UnsupportedHost, match="aarch64"):
        edgeml.load(path, cache_dir=tmp_path / "c")


def test_cuda_artifact_without_a_gpu_is_a_clear_error(tiny_onnx, tmp_path):
    import edgeml
    from edgeml.targets import host_features
    from tvm_artifacts import build_tvm_artifact

    if "cuda" in host_features():
        pytest.skip("this machine has a CUDA GPU; scripts/gpu_proof.sh covers it")
    path = build_tvm_artifact(tiny_onnx, "nvidia-gpu", tmp_path / "gpu.edgepkg")
    with pytest.raises(BackendError, match="cuda device"):
        edgeml.load(path, cache_dir=tmp_path / "c", check_host=False)


def test_unsupported_operator_is_named(tmp_path):
    from onnx import TensorProto, helper

    from edgeml.backends.tvm.build import import_relax

    node = helper.make_node("Celu", ["x"], ["y"], alpha=1.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOp, match="Celu") as info:
        import_relax(model)
    assert "TVM" in str(info.value) and info.value.hint


def test_candidates_follow_the_target(tiny_onnx, tmp_path):
    from edgeml.backends.base import BuildContext
    from edgeml.targets import get_target
    from tvm_artifacts import onnx_io

    inputs, outputs = onnx_io(tiny_onnx)

    def specs(target, **options):
        ctx = BuildContext(onnx_path=tiny_onnx, target=get_target(target), inputs=inputs, outputs=outputs,
                           workdir=tmp_path, options=options)
        return TvmCompiler().candidates(ctx, ["fp32", "int8"])

    assert specs("intel-gpu") == []                       # TVM does not serve it
    (gpu,) = specs("nvidia-gpu", tune_budget="10m")
    assert gpu.recipe["tuned"] is False and "GPU" in gpu.recipe["untuned_reason"]
    (arm,) = specs("aarch64-a72", tune_budget="10m")
    assert arm.recipe["tuned"] is False and "cannot run" in arm.recipe["untuned_reason"]
    from edgeml.targets import best_host_target

    (host,) = specs(best_host_target().name, tune_budget="90s")
    assert host.recipe["tuned"] is True and host.recipe["tune_budget_s"] == 90
    assert host.label == "tvm/fp32/tuned"


@pytest.mark.parametrize("value, seconds", [(None, 0), ("", 0), (600, 600), ("600", 600), ("90s", 90),
                                            ("10m", 600), ("1h30m", 5400), ("1.5m", 90)])
def test_parse_budget(value, seconds):
    assert parse_budget(value) == seconds


@pytest.mark.parametrize("value", ["ten minutes", "10x", "-5"])
def test_parse_budget_rejects_nonsense(value):
    with pytest.raises(UsageError):
        parse_budget(value)


def test_target_without_tvm_table_is_a_compile_error():
    from edgeml.backends.tvm.build import tvm_target

    with pytest.raises(CompileError, match="no \\[tvm\\] table"):
        tvm_target({})


def test_a_host_without_a_c_compiler_gets_a_clear_missing_dependency(monkeypatch, tmp_path):
    from tvm.support import cc

    from edgeml.backends.tvm.build import export
    from edgeml.errors import MissingDependency

    monkeypatch.setattr(cc, "get_cc", lambda: None)
    with pytest.raises(MissingDependency, match=r"C/C\+\+ compiler") as info:
        export(object(), tmp_path / "model.so", None, None)
    assert "apt-get install g++" in str(info.value)
    assert not (tmp_path / "model.so").exists()
