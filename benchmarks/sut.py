"""The system under test: an ``.edgepkg`` (via ``edgeml.load``) or a raw ``.onnx`` (ONNX Runtime defaults).

A ``BenchTarget`` knows its inputs, makes random feeds for a batch size, and
hands out one *runner* per worker thread (a callable that runs one batch).
ONNX Runtime sessions are thread-safe, so workers share one; other backends
(an OpenVINO infer request, a TVM module) get their own loaded copy per worker.
Opening measures the cold start (load to first inference) with the injected clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.errors import ModelError, UsageError
from edgeml.runtime.model import TensorSpec, resident_memory_mb

Runner = Callable[[dict[str, np.ndarray]], Any]

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}


# Integer inputs recognised by name as token inputs (the Hugging Face names).
TOKEN_TYPE_NAMES = ("token_type_ids",)
TOKEN_MASK_NAMES = ("attention_mask",)
TOKEN_ID_NAMES = ("input_ids", "token_ids")
# Token ids are drawn from [0, DEFAULT_VOCAB) when neither the model file nor its metadata says the vocabulary:
# every real tokenizer's vocabulary is larger, so these ids are valid rows of any embedding table.
DEFAULT_VOCAB = 1000
MAX_DATA_BYTES = 1 << 30          # --data: the arrays of one .npz together (hostile-input bound)
MAX_FEED_BYTES = 1 << 30          # generated inputs: all feeds of one call together (an --input-shape typo)
MAX_DATA_ARRAYS = 64


def token_role(spec: TensorSpec) -> str | None:
    """'ids', 'mask', 'type' for an integer token input (by its name), else None."""
    if np.dtype(spec.dtype).kind not in "iu":
        return None
    name = spec.name.lower()
    for role, names in (("type", TOKEN_TYPE_NAMES), ("mask", TOKEN_MASK_NAMES), ("ids", TOKEN_ID_NAMES)):
        if any(name.endswith(n) for n in names):
            return role
    return None


def _shape_for(spec: TensorSpec, batch: int) -> list[int]:
    shape = []
    for axis, dim in enumerate(spec.shape):
        if dim is None:
            if axis != 0:
                example = ",".join(str(d or 1) if a != axis else "N" for a, d in enumerate(spec.shape))
                raise UsageError(
                    f"input '{spec.name}' has a dynamic axis {axis} (e.g. a sequence length); edgeml bench cannot "
                    "guess its size",
                    hint=f"give it with --input-shape {spec.name}={example}, or real inputs with --data FILE.npz",
                )
            dim = batch
        shape.append(dim)
    return shape


def random_array(spec: TensorSpec, batch: int, rng: np.random.Generator, *, vocab: int | None = None) -> np.ndarray:
    """Random data of the spec's dtype; axis 0 is the batch when dynamic.

    Token inputs (by name): ids uniform in [0, vocab), attention mask all ones, token types zeros.
    """
    shape = _shape_for(spec, batch)
    dtype = np.dtype(spec.dtype)
    role = token_role(spec)
    if role == "ids":
        return rng.integers(0, vocab or DEFAULT_VOCAB, size=shape).astype(dtype)
    if role in ("mask", "type"):
        return (np.ones if role == "mask" else np.zeros)(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise UsageError(f"input '{spec.name}' has dtype {spec.dtype}, which edgeml bench cannot generate")


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def apply_input_shapes(specs: list[TensorSpec], shapes: dict[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Fix the dynamic non-batch axes from ``--input-shape`` (axis 0 stays the batch when dynamic)."""
    by_name = {s.name: s for s in specs}
    for name in shapes:
        if name not in by_name:
            raise UsageError(f"--input-shape names '{name}', which is not an input of the model",
                             hint=f"the inputs are: {', '.join(by_name)}")
    out = []
    for spec in specs:
        given = shapes.get(spec.name)
        if given is None:
            out.append(spec)
            continue
        if len(given) != len(spec.shape) or any(m is not None and m != g for m, g in zip(spec.shape, given)):
            raise UsageError(f"--input-shape {spec.name}={','.join(map(str, given))} does not fit the model's "
                             f"{_shape_text(spec.shape)}", hint="keep the rank and every fixed dimension")
        dims = tuple(None if axis == 0 and spec.shape[0] is None else g for axis, g in enumerate(given))
        out.append(TensorSpec(spec.name, spec.dtype, dims))
    return out


def shapes_batch(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The batch (axis 0) the --input-shape values agree on, None when none given."""
    firsts = {s[0] for s in shapes.values()}
    if len(firsts) > 1:
        raise UsageError(f"--input-shape values disagree on axis 0 (the batch): {sorted(firsts)}")
    return firsts.pop() if firsts else None


def load_data(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Real inputs from an .npz keyed by input name (axis 0 = samples), checked against ``specs``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data {path} does not exist", hint="pass an .npz with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if len(names) > MAX_DATA_ARRAYS:
                raise UsageError(f"--data {path} holds {len(names)} arrays; at most {MAX_DATA_ARRAYS}")
            arrays = _read_bounded(npz, names, path)
    except UsageError:
        raise
    except Exception as exc:  # zipfile / numpy raise many types for a bad file
        raise UsageError(f"--data {path} is not a readable .npz: {exc}",
                         hint="write it with numpy.savez(path, input_name=array, ...)") from None
    want = {s.name for s in specs}
    if set(arrays) != want:
        raise UsageError(f"--data {path} has arrays {sorted(arrays)}; the model's inputs are {sorted(want)}",
                         hint="give exactly one array per input, named after it")
    out = {s.name: _data_array(s, arrays[s.name], path) for s in specs}
    counts = {a.shape[0] for a in out.values()}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(f"--data {path}: the arrays must share a positive sample count (axis 0), got {sorted(counts)}")
    return out


def _read_bounded(npz, names: list[str], path: Path) -> dict[str, np.ndarray]:
    arrays, total = {}, 0
    for name in names:
        arr = npz[name]
        total += arr.nbytes
        if total > MAX_DATA_BYTES:
            raise UsageError(f"--data {path} is larger than {MAX_DATA_BYTES >> 20} MiB unpacked",
                             hint="benchmark on a smaller sample of the data")
        arrays[name] = arr
    return arrays


def _data_array(spec: TensorSpec, arr: np.ndarray, path: Path) -> np.ndarray:
    shape = arr.shape
    if len(shape) != len(spec.shape) or any(m is not None and m != g for m, g in list(zip(spec.shape, shape))[1:]):
        raise UsageError(f"--data {path}: array '{spec.name}' has shape {list(shape)}; the model expects "
                         f"{_shape_text(spec.shape)} (axis 0 = samples)")
    dtype = np.dtype(spec.dtype)
    if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise UsageError(f"--data {path}: array '{spec.name}' is {arr.dtype}; the model expects {dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def vocab_from_onnx(path: Path, input_name: str) -> int | None:
    """The rows of the embedding table ``input_name`` indexes (a Gather, or ORT's fused EmbedLayerNormalization),
    or the model's ``vocab_size`` metadata; None when neither is found."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable file only costs the vocabulary, the session reports the real fault
        return None
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("vocab_size", "").isdigit():
        return int(props["vocab_size"])
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:   # a quantized table: Gather reads DequantizeLinear(table)
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in dims:
            dims.setdefault(node.output[0], dims[node.input[0]])
    for node in proto.graph.node:
        table = None
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            table = node.input[0]
        elif node.op_type == "EmbedLayerNormalization" and node.input and node.input[0] == input_name:
            table = node.input[2] if len(node.input) > 2 else None
        if table in dims and dims[table]:
            return int(dims[table][0])
    return None


def batch_of(specs: list[TensorSpec], requested: int) -> int:
    """The batch a query really uses: --batch for a dynamic axis 0, else the static size."""
    static = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    dynamic = any(s.shape and s.shape[0] is None for s in specs)
    if static and not dynamic:
        size = static.pop() if len(static) == 1 else None
        if size is None:
            raise UsageError(f"inputs disagree on axis 0 ({sorted(static)}); cannot pick a batch")
        if requested not in (1, size):
            raise UsageError(f"the model's batch axis is fixed at {size}; --batch {requested} cannot apply",
                             hint="export the model with a dynamic batch axis, or leave --batch out")
        return size
    return requested


class BenchTarget:
    """Base: subclasses set ``inputs``, ``info`` and implement ``_new_runner``."""

    kind = "abstract"
    shares_runner = True

    def __init__(self, path: Path | str, *, threads: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.path = Path(path)
        self.threads = threads
        self.clock = clock
        self.inputs: list[TensorSpec] = []
        self.info: dict[str, Any] = {}
        self.cold_start: dict[str, float] = {}
        self.memory: dict[str, float] = {}
        self._runners: list[Runner] = []
        self.data: dict[str, np.ndarray] | None = None   # --data: real inputs, axis 0 = samples
        self.data_path: Path | None = None
        self.vocab: int | None = None                    # token-id range, when the model says it

    # -- data
    def configure(self, input_shapes: dict[str, tuple[int, ...]] | None = None, data: Path | None = None) -> None:
        """Apply ``--input-shape`` and ``--data`` to the model's inputs (before ``open``)."""
        if input_shapes and data is not None:
            raise UsageError("give either --input-shape or --data, not both",
                             hint="with --data the shapes come from the arrays")
        if input_shapes:
            self.inputs = apply_input_shapes(self.inputs, input_shapes)
        if data is not None:
            self.data = load_data(data, self.inputs)
            self.data_path = Path(data)
            self.inputs = [TensorSpec(s.name, s.dtype, (s.shape[0], *self.data[s.name].shape[1:])) for s in self.inputs]

    def token_vocab(self) -> int | None:
        """Subclasses that can read the model's embedding table say its rows."""
        return None

    def make_feeds(self, batch: int, rng: np.random.Generator, count: int = 4) -> list[dict[str, np.ndarray]]:
        if self.data is not None:
            return self._data_feeds(batch, rng, count)
        self._check_feed_size(batch, max(1, count))
        if self.vocab is None and any(token_role(s) == "ids" for s in self.inputs):
            self.vocab = self.token_vocab() or 0
        return [{s.name: random_array(s, batch, rng, vocab=self.vocab or None) for s in self.inputs}
                for _ in range(max(1, count))]

    def _check_feed_size(self, batch: int, count: int) -> None:
        total = 0
        for spec in self.inputs:
            total += int(np.prod(_shape_for(spec, batch), dtype=np.int64)) * np.dtype(spec.dtype).itemsize * count
            if total > MAX_FEED_BYTES:
                raise UsageError(f"the random inputs would take more than {MAX_FEED_BYTES >> 20} MiB "
                                 f"(input '{spec.name}' at batch {batch})",
                                 hint="use a smaller --input-shape or --batch")

    def _data_feeds(self, batch: int, rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
        """Consecutive batches of the samples (wrapping), from a seeded start; enough to cover them (<= 64)."""
        assert self.data is not None
        n = next(iter(self.data.values())).shape[0]
        count = max(count, min(64, -(-n // batch)))
        start = int(rng.integers(0, n))
        feeds = []
        for i in range(max(1, count)):
            idx = (start + i * batch + np.arange(batch)) % n
            feeds.append({name: arr[idx] for name, arr in self.data.items()})
        return feeds

    def inputs_used(self, batch: int) -> dict[str, Any]:
        """What the benchmark fed: each input's shape and dtype, where it came from, and the sequence length."""
        used: dict[str, Any] = {}
        seq = None
        for spec in self.inputs:
            role = token_role(spec)
            shape = [batch if (a == 0 and d is None) else d for a, d in enumerate(spec.shape)]
            if self.data is not None:
                source = f"data {self.data_path}"
            elif role == "ids":
                source = f"random token ids in [0, {self.vocab or DEFAULT_VOCAB})" + (
                    "" if self.vocab else " (default range: the model did not say its vocabulary)")
            elif role == "mask":
                source = "ones"
            elif role == "type":
                source = "zeros"
            else:
                source = "random"
            used[spec.name] = {"shape": shape, "dtype": spec.dtype, "source": source, "token_role": role}
            if role in ("ids", "mask") and len(shape) >= 2 and seq is None:
                seq = shape[1]
        return {"inputs": used, "sequence_length": seq}

    def batch_for(self, requested: int) -> int:
        return batch_of(self.inputs, requested)

    # -- runners
    def _new_runner(self, first: bool) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError

    def runners(self, n: int) -> list[Runner]:
        """``n`` runners for ``n`` concurrent workers (shared when the backend is thread-safe)."""
        while len(self._runners) < n:
            if self._runners and self.shares_runner:
                self._runners.append(self._runners[0])
            else:
                self._runners.append(self._new_runner(first=not self._runners))
        return self._runners[:n]

    def open(self, rng: np.random.Generator) -> "BenchTarget":
        """Load and run the first inference; records cold start and memory."""
        self.memory["rss_before_load_mb"] = round(resident_memory_mb(), 1)
        t0 = self.clock()
        runner = self.runners(1)[0]
        t1 = self.clock()
        feeds = self.make_feeds(self.batch_for(1), rng, count=1)[0]
        runner(feeds)
        t2 = self.clock()
        self.cold_start = {"load_ms": (t1 - t0) * 1e3, "first_inference_ms": (t2 - t1) * 1e3,
                           "cold_start_ms": (t2 - t0) * 1e3}
        self.memory["rss_after_load_mb"] = round(resident_memory_mb(), 1)
        return self

    def close(self) -> None:
        self._runners.clear()


class OnnxTarget(BenchTarget):
    """A raw ONNX file on ONNX Runtime with its default session options ("before compile")."""

    kind = "onnx"

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        import onnxruntime as ort

        if not self.path.is_file():
            raise ModelError(f"model {self.path} does not exist")
        self._ort = ort
        session = self._session()
        self._first_session = session
        self.inputs = [TensorSpec(i.name, _ORT_TYPES.get(i.type, "float32"),
                                  tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape))
                       for i in session.get_inputs()]
        from edgeml.runtime.signing import file_sha256

        self.info = {
            "kind": "onnx", "path": str(self.path), "name": self.path.stem, "version": None,
            "sha256": file_sha256(self.path), "precision": _onnx_precision(self.inputs),
            "backend": "onnxruntime", "backend_version": ort.__version__,
            "backend_options": {"session_options": "onnxruntime defaults", "intra_op_threads": self.threads},
            "target": None, "inputs": [s.to_dict() for s in self.inputs],
        }

    def _session(self):
        so = self._ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        try:
            return self._ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unexported types
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {exc}",
                             hint="check the file is a valid ONNX model (python -m onnx.checker)") from exc

    def token_vocab(self) -> int | None:
        ids = next((s.name for s in self.inputs if token_role(s) == "ids"), None)
        return vocab_from_onnx(self.path, ids) if ids else None

    def _new_runner(self, first: bool) -> Runner:
        session = self._first_session if first and self._first_session is not None else self._session()
        self._first_session = None
        return lambda feeds: session.run(None, feeds)

    def open(self, rng):
        # Cold start = session creation + first inference, measured fresh.
        self._first_session = None
        self._runners.clear()
        return super().open(rng)


def _onnx_precision(inputs: list[TensorSpec]) -> str:
    return "fp16" if any(s.dtype == "float16" for s in inputs) else "fp32"


class ArtifactTarget(BenchTarget):
    """An ``.edgepkg`` loaded and verified by ``edgeml.load``."""

    kind = "edgepkg"

    def __init__(self, path, *, trusted_keys=None, cache_dir=None, **kw):
        super().__init__(path, **kw)
        from edgeml.runtime.artifact import artifact_sha256, read_manifest

        manifest = read_manifest(self.path)
        self._load_kw = {"trusted_keys": list(trusted_keys or []), "threads": self.threads}
        if cache_dir:
            self._load_kw["cache_dir"] = cache_dir
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.shares_runner = manifest["backend"]["name"] == "onnxruntime"
        self.models: list[Any] = []
        backend = manifest["backend"]
        self.info = {
            "kind": "edgepkg", "path": str(self.path), "name": manifest["name"], "version": manifest["version"],
            "sha256": artifact_sha256(self.path), "precision": manifest["precision"],
            "backend": backend["name"], "backend_version": backend.get("version"),
            "backend_options": backend.get("options", {}), "target": manifest["target"],
            "quantization": manifest.get("quantization"), "inputs": [s.to_dict() for s in self.inputs],
        }

    def token_vocab(self) -> int | None:
        """Read from the entrypoint when it is an ONNX model (an OpenVINO IR keeps the default range)."""
        ids = next((s.name for s in self.inputs if token_role(s) == "ids"), None)
        if not ids or not self.models:
            return None
        entry = self.models[0].artifact.entrypoint
        return vocab_from_onnx(entry, ids) if entry.suffix == ".onnx" else None

    def _new_runner(self, first: bool) -> Runner:
        import edgeml

        model = edgeml.load(self.path, **self._load_kw)
        self.models.append(model)
        self.info.setdefault("backend_version_loaded", model.backend.version())
        return lambda feeds: model.predict(feeds, validate=False)

    def close(self) -> None:
        for m in self.models:
            m.close()
        self.models.clear()
        super().close()


def open_target(path: Path | str, *, threads: int | None = None, clock: Callable[[], float] = time.perf_counter,
                rng: np.random.Generator | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
                data: Path | None = None, **kw) -> BenchTarget:
    """Open ``path`` (.edgepkg or .onnx), apply --input-shape / --data, and run its first inference."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".onnx" and (path.is_dir() or not path.exists()):   # the same message and code as serve/inspect
        from edgeml.runtime.archive import check_artifact_path

        check_artifact_path(path)
    if not path.exists():
        raise ModelError(f"model {path} does not exist", hint="pass an .edgepkg from edgeml compile, or an .onnx file")
    if suffix == ".onnx":
        target: BenchTarget = OnnxTarget(path, threads=threads, clock=clock)
    elif suffix == ".edgepkg":
        target = ArtifactTarget(path, threads=threads, clock=clock, **kw)
    else:
        raise UsageError(f"{path} is neither an .edgepkg nor an .onnx file",
                         hint="edgeml bench takes a compiled artifact or a raw ONNX model")
    target.configure(input_shapes, data)
    return target.open(rng if rng is not None else np.random.default_rng(0))
