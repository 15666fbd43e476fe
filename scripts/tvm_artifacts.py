"""Helpers shared by scripts/aarch64_proof.py, scripts/gpu_proof.sh and tests/tvm.

* ``tiny_cnn_onnx``: a random-weight digits-sized CNN (1x8x8 input, 10 classes),
  built with onnx.helper so no torch is needed.
* ``build_tvm_artifact`` / ``build_ort_artifact``: one backend's artifact for one
  target, written with ``edgeml.runtime.artifact.write_artifact``. They call the
  compiler backends directly (no candidate selection), so a proof checks exactly
  the backend it names. ``compile_artifact`` prefers the full pipeline
  (``edgeml.compile --backend ...``) and says which path it used.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def tiny_cnn_onnx(path: Path, seed: int = 0, batch: str | int = "batch") -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "c1_w": w(8, 1, 3, 3), "c1_b": w(8, scale=0.1),
        "c2_w": w(16, 8, 3, 3, scale=0.15), "c2_b": w(16, scale=0.1),
        "fc_w": w(10, 16), "fc_b": w(10, scale=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeml-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_io(onnx_path: Path):
    """(inputs, outputs) as edgeml TensorSpecs, read from the ONNX graph."""
    import onnx

    from edgeml.runtime.model import TensorSpec

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(vi):
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        shape = tuple(d.dim_value if d.dim_value > 0 else None for d in tt.shape.dim)
        return TensorSpec(vi.name, dtype, shape)

    return [spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output]


def _manifest(target, backend: str, version: str, built, inputs, outputs, name: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": name,
        "version": "0.1.0",
        "target": target.name,
        "required_features": list(target.required_features),
        "arch": target.arch,
        "backend": {"name": backend, "version": version, "entrypoint": built["entrypoint"],
                    "options": built.get("options", {})},
        "precision": "fp32",
        "quantization": built.get("recipe", {}),
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "files": {},
        "candidates": [{"label": built.get("label", backend), "notes": built.get("notes", [])}],
        "provenance": {"built_by": "scripts/tvm_artifacts.py"},
        "runtime": {"threads": target.default_threads or None},
    }


def build_tvm_artifact(onnx_path: Path, target_name: str, output: Path, *, workdir: Path | None = None,
                       options: dict[str, Any] | None = None,
                       progress: Callable[[str], None] = lambda m: None) -> Path:
    """TvmCompiler.build for ``target_name`` -> ``output`` (.edgepkg)."""
    from edgeml.backends.base import BuildContext
    from edgeml.backends.tvm.build import TvmCompiler
    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import get_target

    target = get_target(target_name)
    inputs, outputs = onnx_io(onnx_path)
    output = Path(output)
    workdir = Path(workdir or output.parent / f".{output.stem}-work")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(onnx_path=Path(onnx_path), target=target, inputs=inputs, outputs=outputs,
                       workdir=workdir, options=dict(options or {}), progress=progress)
    compiler = TvmCompiler()
    specs = compiler.candidates(ctx, ["fp32"])
    if not specs:
        raise RuntimeError(f"TVM offers no candidate for target {target_name}")
    built = compiler.build(specs[0], ctx)
    info = {"entrypoint": built.entrypoint, "options": built.backend_options, "recipe": built.recipe,
            "notes": built.notes, "label": specs[0].label}
    manifest = _manifest(target, "tvm", compiler.version(), info, inputs, outputs, Path(onnx_path).stem)
    return write_artifact(output, manifest, built.files)


def build_ort_artifact(onnx_path: Path, target_name: str, output: Path) -> Path:
    """An FP32 ONNX Runtime artifact (the ONNX file as is) for ``target_name``."""
    import onnxruntime

    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import get_target

    target = get_target(target_name)
    inputs, outputs = onnx_io(onnx_path)
    info = {"entrypoint": "model/model.onnx", "options": {"graph_optimization_level": "all"},
            "label": "onnxruntime/fp32"}
    manifest = _manifest(target, "onnxruntime", onnxruntime.__version__, info, inputs, outputs, Path(onnx_path).stem)
    return write_artifact(Path(output), manifest, {"model/model.onnx": Path(onnx_path)})


def compile_artifact(onnx_path: Path, target_name: str, backend: str, output: Path, *,
                     workdir: Path | None = None, log: Callable[[str], None] = print,
                     options: dict[str, Any] | None = None, builder: str = "auto",
                     progress: Callable[[str], None] | None = None) -> Path:
    """``edgeml.compile(..., backend=backend, precision="fp32")`` (builder "pipeline"), the backends
    directly ("direct"), or the pipeline when it is importable ("auto")."""
    start = time.perf_counter()
    if builder == "auto":
        try:
            from edgeml.compiler import pipeline  # noqa: F401
            builder = "pipeline"
        except ImportError:
            builder = "direct"
    if builder == "pipeline":
        import edgeml

        path = edgeml.compile(str(onnx_path), target=target_name, output=str(output), backend=backend,
                              precision="fp32", cache_dir=False, benchmark=False, progress=progress,
                              **(options or {}))
        log(f"  {backend} artifact for {target_name} via edgeml.compile in {time.perf_counter() - start:.1f}s")
        return Path(path)
    if backend == "tvm":
        path = build_tvm_artifact(onnx_path, target_name, output, workdir=workdir, options=options,
                                  progress=progress or (lambda m: None))
    else:
        path = build_ort_artifact(onnx_path, target_name, output)
    log(f"  {backend} artifact for {target_name} built directly (no pipeline) in {time.perf_counter() - start:.1f}s")
    if workdir and Path(workdir).exists():
        shutil.rmtree(workdir, ignore_errors=True)
    return path
