"""Import a model into one normalized FP32 ONNX file.

Accepted sources:

* an ONNX file, opset 7 and up. Old files that list initializers among the
  graph inputs get those inputs removed; weights carried as ``Constant`` nodes
  become initializers (so quantizers see them); opsets below 13 are upgraded
  with ``onnx.version_converter`` (per-channel QDQ needs 13).
* a PyTorch factory ``pkg.module:factory`` (a callable returning an
  ``nn.Module``; needs ``--input-shape``), exported with torch's TorchScript
  exporter (dynamic batch axis), falling back to the dynamo exporter.
* a saved ``torch.export`` ExportedProgram (``.pt2``), exported with the dynamo
  exporter (needs onnxscript).

``--input-shape NAME=D0,D1,...`` fixes dims. Afterwards only the first
(batch) axis may stay dynamic; any other unknown dim is a ModelError that says
which ``--input-shape`` to pass.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeml.errors import ModelError, UnsupportedOp, require
from edgeml.runtime.model import TensorSpec

MIN_OPSET = 7
UPGRADE_BELOW = 13
UPGRADE_TO = 17
DYNAMO_OPSET = 18       # the dynamo exporter's native opset (others go through a version converter)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class ImportedModel:
    onnx_path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: dict[str, Any]                 # {kind, name, sha256, opset, ...} for provenance
    notes: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.source["sha256"]


def is_factory_spec(model: str) -> bool:
    return bool(_FACTORY.match(str(model))) and not Path(str(model)).exists()


def import_model(model: Any, input_shape: dict[str, tuple[int, ...]], workdir: Path,
                 progress: Callable[[str], None] = lambda m: None) -> ImportedModel:
    workdir.mkdir(parents=True, exist_ok=True)
    onnx = require("onnx", feature="compiling a model")
    if not isinstance(model, (str, Path)) and _is_torch_module(model):
        progress("exporting the PyTorch module to ONNX")
        proto, source = _export_module(model, input_shape, "<nn.Module object>", workdir)
    elif isinstance(model, str) and is_factory_spec(model):
        progress(f"exporting PyTorch factory {model} to ONNX")
        proto, source = _export_module(_call_factory(model), input_shape, model, workdir)
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist",
                             hint="pass an .onnx file, a .pt2 ExportedProgram or a PyTorch factory 'pkg.module:function'")
        if not path.is_file():
            raise ModelError(f"model {path} is not a file")
        if path.suffix in (".pt2", ".ep"):
            progress(f"exporting ExportedProgram {path.name} to ONNX")
            proto, source = _export_program(path, input_shape, workdir)
        else:
            progress(f"reading {path.name}")
            proto, source = _read_onnx(path)
    notes: list[str] = []
    proto = normalize(proto, notes)
    # PyTorch: --input-shape was the tracing shape; the export keeps the batch axis dynamic.
    proto = _fix_shapes(proto, {} if source["kind"].startswith("pytorch") else input_shape)
    _check(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:  # onnx raises InferenceError / RuntimeError
        notes.append(f"shape inference incomplete: {exc}")
    out = workdir / "imported.onnx"
    out.write_bytes(proto.SerializeToString(deterministic=True))
    inputs, outputs = io_specs(proto)
    source["opset"] = opset_of(proto)
    return ImportedModel(out, inputs, outputs, source, notes)


def fingerprint(model: Any) -> str | None:
    """sha256 identifying a model file without importing it (None for factories / module objects).

    Equals the ``sha256`` that import_model records for the same file, so the
    compile cache can answer before the (slower) import.
    """
    if not isinstance(model, (str, Path)) or is_factory_spec(str(model)):
        return None
    path = Path(model)
    if not path.is_file():
        return None
    if path.suffix in (".pt2", ".ep"):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return _read_onnx(path)[1]["sha256"]


# ---------------------------------------------------------------- ONNX files


def _read_onnx(path: Path):
    import onnx

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    digest = hashlib.sha256(raw)
    try:
        proto = onnx.load_model_from_string(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})",
                         hint="export it again with torch.onnx.export or check the file is complete") from exc
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"{path} is not a readable ONNX model (no graph found)",
                         hint="export it again with torch.onnx.export or check the file is complete")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, str(path.parent))
            for t in sorted(proto.graph.initializer, key=lambda t: t.name):
                digest.update(t.raw_data)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read its external weight file: {exc}",
                             hint="keep the .onnx.data file next to the model") from exc
    return proto, {"kind": "onnx", "name": path.name, "sha256": digest.hexdigest(),
                   "opset_original": opset_of(proto)}


def opset_of(proto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def normalize(proto, notes: list[str]):
    """Old-file fixes: initializers listed as inputs, Constant-node weights, old opsets."""
    import onnx

    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    stale = [i for i in graph.input if i.name in init_names]
    if stale:
        keep = [i for i in graph.input if i.name not in init_names]
        del graph.input[:]
        graph.input.extend(keep)
        notes.append(f"removed {len(stale)} initializers listed as graph inputs")
    constants = [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                 and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    if constants:
        for node in constants:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        keep_nodes = [n for n in graph.node if n not in constants]
        del graph.node[:]
        graph.node.extend(keep_nodes)
        notes.append(f"turned {len(constants)} Constant nodes into initializers")
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    opset = opset_of(proto)
    if opset < MIN_OPSET:
        raise ModelError(f"model uses ONNX opset {opset}; edgeml imports opset {MIN_OPSET} and up",
                         hint="re-export the model with a newer exporter")
    if proto.ir_version < 4 or opset < UPGRADE_BELOW:
        # IR < 4 requires initializers to be graph inputs; we removed them, so raise the IR version.
        proto.ir_version = max(proto.ir_version, 7)
    if opset < UPGRADE_BELOW:
        from onnx import version_converter

        for goal in (UPGRADE_TO, UPGRADE_BELOW):
            try:
                upgraded = version_converter.convert_version(proto, goal)
                onnx.checker.check_model(upgraded)
            except Exception as exc:  # converter raises RuntimeError / ValidationError
                notes.append(f"opset {opset} -> {goal} upgrade failed: {str(exc).splitlines()[0][:200]}")
                continue
            notes.append(f"upgraded opset {opset} -> {goal}")
            proto = upgraded
            break
    return proto


def _dims(value_info) -> list[int | str | None]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _fix_shapes(proto, input_shape: dict[str, tuple[int, ...]]):
    graph = proto.graph
    names = [i.name for i in graph.input]
    unknown = [n for n in input_shape if n not in names]
    if unknown:
        raise ModelError(f"--input-shape names {unknown[0]!r}, which is not a model input; the inputs are {names}")
    for vi in graph.input:
        dims = _dims(vi)
        has_shape = vi.type.tensor_type.HasField("shape")
        if vi.name in input_shape:
            want = input_shape[vi.name]
            if has_shape and len(dims) != len(want):
                raise ModelError(
                    f"--input-shape {vi.name}={','.join(map(str, want))} has rank {len(want)}; "
                    f"the model's input {vi.name!r} has rank {len(dims)} ({_fmt(dims)})")
            for axis, (have, new) in enumerate(zip(dims, want)):
                if isinstance(have, int) and have > 0 and have != new:
                    raise ModelError(
                        f"--input-shape {vi.name}={','.join(map(str, want))} conflicts with the model: "
                        f"axis {axis} of {vi.name!r} is fixed to {have} ({_fmt(dims)})")
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in want:
                shape.dim.add().dim_value = int(d)
            continue
        if not has_shape:
            raise ModelError(f"model input {vi.name!r} has no shape",
                             hint=f"pass --input-shape {vi.name}=D0,D1,... (e.g. {vi.name}=1,3,224,224)")
        dyn = [axis for axis, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        if _is_token_input(vi, dims):  # [batch, sequence] ids / masks: the sequence length stays dynamic
            continue
        if any(axis != 0 for axis in dyn):
            example = ",".join("1" if a == 0 else (str(d) if isinstance(d, int) and d > 0 else "N?")
                               for a, d in enumerate(dims))
            raise ModelError(
                f"model input {vi.name!r} has dynamic non-batch dims {_fmt(dims)}; edgeml needs them fixed",
                hint=f"pass --input-shape {vi.name}={example} (replace N? by the size you will serve)")
    return proto


def _is_token_input(value_info, dims: list[int | str | None]) -> bool:
    """An integer ``[batch, sequence]`` input (``input_ids``, ``attention_mask``, ``token_type_ids``).

    Text encoders are served at many sequence lengths, and every backend here that serves them (ONNX
    Runtime, OpenVINO) runs a dynamic sequence axis; a float input's dynamic dims (an image's height and
    width) must still be fixed, since the conv backends and TVM plan memory for one shape.
    """
    from onnx import TensorProto

    integer = value_info.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)
    return integer and len(dims) == 2 and not (isinstance(dims[1], int) and dims[1] > 0)


def _fmt(dims) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in dims) + "]"


def _check(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError
        text = str(exc)
        m = re.search(r"No (?:Op|Schema) registered for (\w+) with domain_version of (\d+)", text) or \
            re.search(r"No Op registered for (\w+)", text)
        if m:
            raise UnsupportedOp(
                f"operator {m.group(1)!r} is not a known ONNX operator (opset {opset_of(proto)}); no backend "
                f"(onnxruntime, openvino, tvm) can compile it",
                hint="replace the op in the source model, or export it with a standard ONNX opset") from exc
        raise ModelError(f"the ONNX model is invalid: {text.splitlines()[0][:300]}") from exc


def io_specs(proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from onnx import helper

    def spec(vi) -> TensorSpec:
        elem = vi.type.tensor_type.elem_type
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(elem)) if elem else "float32"
        except KeyError:
            dtype = "float32"
        dims = tuple(d if isinstance(d, int) and d > 0 else None for d in _dims(vi))
        return TensorSpec(vi.name, dtype, dims)

    init = {t.name for t in proto.graph.initializer}
    return [spec(v) for v in proto.graph.input if v.name not in init], [spec(v) for v in proto.graph.output]


# ---------------------------------------------------------------- PyTorch


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _call_factory(spec: str):
    require("torch", feature="importing a PyTorch model")
    import torch

    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import PyTorch factory module {module_name!r}: {exc}",
                         hint="the module must be importable from the current folder or PYTHONPATH") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{spec}: {module_name} has no callable {attr!r}")
    try:
        net = factory()
    except Exception as exc:
        raise ModelError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"{spec}() returned {type(net).__name__}; it must return a torch.nn.Module")
    return net


def _export_module(net, input_shape: dict[str, tuple[int, ...]], label: str, workdir: Path):
    import onnx
    import torch

    if not input_shape:
        raise ModelError(f"PyTorch model {label} needs its input shapes to be exported",
                         hint="pass --input-shape NAME=1,3,224,224 (one per input, in forward() order)")
    net = net.eval()
    names = list(input_shape)
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(*shape, generator=gen) for shape in input_shape.values())
    with torch.no_grad():
        outs = net(*example)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    dynamic = {n: {0: "batch"} for n in names + out_names}
    buf_path = workdir / "export.onnx"
    errors = []
    for dynamo in (False, True):
        try:
            kwargs: dict[str, Any] = dict(input_names=names, output_names=out_names, dynamo=dynamo,
                                          opset_version=DYNAMO_OPSET if dynamo else UPGRADE_TO)
            if dynamo:
                kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim("batch", min=1)} for _ in names)
                kwargs["external_data"] = False
            else:
                kwargs["dynamic_axes"] = dynamic
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, example, str(buf_path), **kwargs)
            raw = buf_path.read_bytes()
            break
        except Exception as exc:  # exporter errors vary by version
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {str(exc)[:300]}")
    else:
        raise ModelError(f"cannot export {label} to ONNX: " + " | ".join(errors))
    proto = onnx.load_model_from_string(raw)
    return proto, {"kind": "pytorch", "name": label, "sha256": hashlib.sha256(raw).hexdigest(),
                   "exporter": "torchscript" if not errors else "dynamo", "torch": torch.__version__}


def _export_program(path: Path, input_shape: dict[str, tuple[int, ...]], workdir: Path):
    require("torch", feature="importing an ExportedProgram")
    import onnx
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a readable torch.export ExportedProgram: {exc}",
                         hint="save it with torch.export.save(torch.export.export(model, args), 'model.pt2')") from exc
    out = workdir / "export.onnx"
    try:
        kwargs: dict[str, Any] = {"dynamo": True, "external_data": False, "opset_version": DYNAMO_OPSET}
        if input_shape:
            kwargs["input_names"] = list(input_shape)
        torch.onnx.export(ep, (), str(out), **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot export ExportedProgram {path} to ONNX: {type(exc).__name__}: {str(exc)[:400]}") from exc
    raw = out.read_bytes()
    return onnx.load_model_from_string(raw), {
        "kind": "pytorch-exported-program", "name": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "exporter": "dynamo", "torch": torch.__version__,
    }



def is_transformer(onnx_path: Path) -> bool:
    """A transformer-style graph: attention (MatMul + Softmax, or a fused Attention) and no convolution.

    Backends use it to offer transformer recipes (ORT fusions and MatMul-only int8, NNCF's transformer
    model type); a wrong guess costs only a candidate, since every candidate is measured.
    """
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    return "Conv" not in ops and "MatMul" in ops and bool({"Softmax", "Attention", "MultiHeadAttention"} & ops)
