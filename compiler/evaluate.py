"""Data sets and accuracy metrics for candidate evaluation.

Metrics (higher is better, in points on a 0-100 scale, so ``--max-accuracy-drop``
is a number of points for every metric; the default 1 point means: 1 % of top-1
accuracy or argmax agreement, a mean cosine similarity of 0.99, or 1 % relative L1 error):

* ``top1``: the eval file has ``labels`` (class indices): top-1 accuracy (%) of
  the first output's argmax.
* ``fp32_agreement`` (class scores): % of samples whose argmax of the first output
  equals the FP32 model's argmax.
* ``cosine_similarity`` (embeddings): ``100 * mean cos(y, ref)`` over the vectors
  along the first output's last axis (one per sample, or one per token for
  ``[N, seq, hidden]``); top-1 agreement of an embedding means nothing.
* ``relative_error_score`` (regression, detection heads, ...):
  ``100 * (1 - sum|y - ref| / sum|ref|)`` over every output (floored at 0).

``ref`` is the eval file's ``reference_<output>`` array when given, else the FP32
model's output. ``choose_metric`` picks one from the output's nature (``explain_metric``
says why): labels -> ``top1``; ``reference_*`` arrays -> ``relative_error_score``;
an output named like an embedding (``embedding``, ``last_hidden_state``, ``pooler``,
``features``...) or whose rows all have unit L2 norm -> ``cosine_similarity``; a
``[N, C]`` output named like class scores, or unnamed -> ``fp32_agreement``;
anything else -> ``relative_error_score``. ``--metric`` overrides the choice.

Every candidate also records ``max_abs_error`` / ``max_rel_error`` against FP32.
Without ``--eval``, the last quarter of ``--calib`` is held out as the proxy
eval split (and not used for calibration); without either, 16 seeded random
samples are used and only agreement with FP32 is measured.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.compiler_data import load_npz
from edgeml.errors import DataError
from edgeml.runtime.model import TensorSpec
from edgeml.runtime.model import fixed_batch as fixed_batch  # the one helper; the pipeline calls ev.fixed_batch

MAX_CHUNK = 64
METRICS = ("top1", "fp32_agreement", "cosine_similarity", "relative_error_score")
METRIC_ALIASES = {"agreement": "fp32_agreement", "cosine": "cosine_similarity", "relative_error": "relative_error_score"}
# Output-name words that say what an output is (matched on lower-case words of the name).
_EMBEDDING_WORDS = re.compile(r"(embed|hidden|pool|feature|sentence|encod|vector|latent|token_embeddings)")
_CLASS_WORDS = re.compile(r"(logit|prob|score|class|softmax|pred|label)")


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    references: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "eval"                    # eval | calib-holdout | calib | synthetic
    file: str | None = None
    sha256: str | None = None

    @property
    def n(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    def take(self, idx: slice) -> "Dataset":
        return Dataset({k: v[idx] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[idx],
                       {k: v[idx] for k, v in self.references.items()}, self.source, self.file, self.sha256)

    def describe(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "samples": self.n, "source": self.source}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_dataset(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], what: str) -> Dataset:
    """Read and check a data file against the model's inputs (and outputs, for references)."""
    path = Path(path)
    data = load_npz(path, what)
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(
            f"{what} file {path} has no array for model input {missing[0]!r} (it has {sorted(data)})",
            hint=f"key the arrays by the model's input names {names}")
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        arr = data[spec.name]
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise DataError(f"{what} file {path}: array {spec.name!r} is empty; the first axis must count samples")
        want = spec.shape
        if len(arr.shape) != len(want) or any(w is not None and g != w for g, w in zip(arr.shape[1:], want[1:])):
            expected = "[N, " + ", ".join("?" if w is None else str(w) for w in want[1:]) + "]"
            raise DataError(
                f"{what} file {path}: array {spec.name!r} has shape {list(arr.shape)}; the model's input "
                f"{spec.name!r} expects {expected} (N = samples)",
                hint="make the data match the model, or pass --input-shape to fix the model's dims")
        target_dtype = np.dtype(spec.dtype)
        if arr.dtype != target_dtype:
            if arr.dtype.kind not in "fiub" or (target_dtype.kind in "iub" and arr.dtype.kind == "f"):
                raise DataError(f"{what} file {path}: array {spec.name!r} has dtype {arr.dtype}; "
                                f"the model expects {target_dtype}")
            arr = arr.astype(target_dtype)
        arrays[spec.name] = np.ascontiguousarray(arr)
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} file {path}: inputs have different sample counts {counts}")
    n = next(iter(counts.values()))
    labels = None
    if "labels" in data:
        labels = data["labels"]
        if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
            raise DataError(f"{what} file {path}: 'labels' must be {n} integer class indices, "
                            f"got shape {list(labels.shape)} dtype {labels.dtype}")
    out_names = {s.name for s in outputs}
    refs = {}
    for key, arr in data.items():
        if key.startswith("reference_"):
            out = key[len("reference_"):]
            if out not in out_names:
                raise DataError(f"{what} file {path}: {key!r} names no model output (outputs: {sorted(out_names)})")
            if arr.shape[0] != n:
                raise DataError(f"{what} file {path}: {key!r} has {arr.shape[0]} samples, inputs have {n}")
            refs[out] = arr
    return Dataset(arrays, labels, refs, "eval", path.name, file_sha256(path))


def synthetic_dataset(inputs: list[TensorSpec], n: int = 16, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = (n, *[1 if d is None else d for d in spec.shape[1:]])
        dtype = np.dtype(spec.dtype)
        arrays[spec.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                             else rng.integers(0, 2, size=shape).astype(dtype))
    return Dataset(arrays, source="synthetic")


def split_holdout(calib: Dataset) -> tuple[Dataset, Dataset]:
    """(calibration part, held-out proxy eval part)."""
    n = calib.n
    if n < 2:
        return calib, Dataset(calib.inputs, calib.labels, calib.references, "calib", calib.file, calib.sha256)
    hold = max(1, n // 4)
    cal = calib.take(slice(0, n - hold))
    ev = calib.take(slice(n - hold, n))
    ev.source = "calib-holdout"
    return cal, ev


def run_batched(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: dict[str, np.ndarray],
                batch: int | None, budget_s: float | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, np.ndarray]:
    """Run over the samples in chunks (the model's fixed batch, else up to MAX_CHUNK).

    With ``budget_s``, stop after the chunk that crosses the budget (a very slow
    candidate, e.g. an untuned TVM build, is then scored on the samples it ran);
    the result's first axis says how many samples that was.
    """
    n = next(iter(inputs.values())).shape[0]
    usable = n - (n % batch) if batch else n
    if usable == 0:
        raise DataError(f"the model has a fixed batch of {batch}; the data has only {n} samples")
    step = batch or (1 if budget_s is not None else MAX_CHUNK)
    parts: dict[str, list[np.ndarray]] = {}
    start = clock()
    i = 0
    while i < usable:
        out = run({k: v[i:i + step] for k, v in inputs.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
        i += step
        if budget_s is not None:
            elapsed = clock() - start
            if elapsed > budget_s:
                break
            if not batch:  # chunks of about a tenth of the budget
                step = max(1, min(MAX_CHUNK, int(budget_s / 10 / max(elapsed / i, 1e-9))))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def usable_samples(n: int, batch: int | None) -> int:
    return n - (n % batch) if batch else n


@dataclass
class Score:
    metric: str
    value: float
    max_abs_error: float
    max_rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": round(self.value, 4),
                "max_abs_error": float(f"{self.max_abs_error:.4g}"), "max_rel_error": float(f"{self.max_rel_error:.4g}")}


def metric_name(requested: str) -> str:
    """``auto``, a metric name or its short alias (``cosine``) -> the metric's full name (or ``auto``)."""
    name = METRIC_ALIASES.get(requested, requested)
    if name != "auto" and name not in METRICS:
        raise ValueError(requested)
    return name


@dataclass(frozen=True)
class MetricChoice:
    name: str
    reason: str           # why this metric: what was seen in the data or the outputs
    source: str           # "auto" (chosen from the output's nature) | "user" (--metric)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason, "source": self.source}


def explain_metric(dataset: Dataset, fp32_outputs: dict[str, np.ndarray], output_names: list[str],
                   requested: str = "auto") -> MetricChoice:
    """The metric for these outputs, and why; ``requested`` (``--metric``) wins when it can be computed."""
    first_name = output_names[0]
    first = np.asarray(fp32_outputs[first_name])
    if requested != "auto":
        _check_requested(requested, dataset, first, first_name)
        return MetricChoice(requested, "chosen with --metric", "user")
    if dataset.labels is not None:
        return MetricChoice("top1", "the eval data has labels", "auto")
    if dataset.references:
        return MetricChoice("relative_error_score", "the eval data has reference_<output> arrays", "auto")
    nature = output_nature(first_name, first)
    if nature == "embedding":
        return MetricChoice("cosine_similarity", f"output {first_name!r} {_embedding_why(first_name)}", "auto")
    if nature == "class_scores":
        return MetricChoice("fp32_agreement", f"output {first_name!r} is [N, {first.shape[1]}] class scores", "auto")
    return MetricChoice("relative_error_score", f"output {first_name!r} of shape {list(first.shape)} is neither "
                        "class scores nor an embedding", "auto")


def output_nature(name: str, first: np.ndarray) -> str:
    """``class_scores`` | ``embedding`` | ``other``, from the output's name, shape and FP32 values."""
    lowered = name.lower()
    if first.ndim >= 2 and first.shape[-1] >= 2 and first.dtype.kind == "f":
        if _EMBEDDING_WORDS.search(lowered) and not _CLASS_WORDS.search(lowered):
            return "embedding"
        if first.ndim == 2 and _unit_rows(first):
            return "embedding"
    if first.ndim == 2 and first.shape[1] >= 2:
        return "class_scores"
    return "other"


def _unit_rows(arr: np.ndarray) -> bool:
    """Every row L2-normalized (a normalized embedding; softmax rows are not, unless one-hot)."""
    if arr.shape[0] == 0 or not np.all(np.isfinite(arr)) or np.all(arr >= 0):
        return False
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))


def _embedding_why(name: str) -> str:
    word = _EMBEDDING_WORDS.search(name.lower())
    return f"is named like an embedding ({word.group(0)!r})" if word else "has unit-norm rows (an embedding)"


def _check_requested(requested: str, dataset: Dataset, first: np.ndarray, first_name: str) -> None:
    if requested == "top1" and dataset.labels is None:
        raise DataError("--metric top1 needs labels in the eval data",
                        hint="add a 'labels' array to the --eval file, or choose --metric fp32_agreement")
    if requested in ("top1", "fp32_agreement") and (first.ndim < 2 or first.shape[-1] < 2):
        raise DataError(f"--metric {requested} takes the argmax of output {first_name!r}, whose shape "
                        f"{list(first.shape)} has no class axis",
                        hint="choose --metric relative_error or --metric cosine")
    if requested == "cosine_similarity" and first.ndim < 2:
        raise DataError(f"--metric cosine needs vectors; output {first_name!r} has shape {list(first.shape)}",
                        hint="choose --metric relative_error")


def choose_metric(dataset: Dataset, fp32_outputs: dict[str, np.ndarray], output_names: list[str],
                  requested: str = "auto") -> str:
    return explain_metric(dataset, fp32_outputs, output_names, requested).name


def cosine_score(outputs: np.ndarray, ref: np.ndarray) -> float:
    """100 x the mean cosine similarity of the vectors along the last axis (two zero vectors agree)."""
    a = np.asarray(outputs, dtype=np.float64).reshape(-1, outputs.shape[-1])
    b = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    if a.shape[0] == 0:
        return 100.0
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-24))
    return 100.0 * float(np.clip(cos, -1.0, 1.0).mean())


def score(metric: str, outputs: dict[str, np.ndarray], fp32: dict[str, np.ndarray], dataset: Dataset,
          output_names: list[str]) -> Score:
    n = next(iter(outputs.values())).shape[0]
    first = output_names[0]
    max_abs = max_rel = 0.0
    for name in output_names:
        a = np.asarray(outputs[name], dtype=np.float64)
        b = np.asarray(fp32[name][:n], dtype=np.float64)
        if a.shape != b.shape:
            raise DataError(f"output {name!r} has shape {list(a.shape)}; FP32 gave {list(b.shape)}")
        if a.size:
            diff = np.abs(a - b)
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max() / max(float(np.abs(b).max()), 1e-12)))
    if metric == "top1":
        assert dataset.labels is not None, "top1 is chosen only when the data has labels"
        value = 100.0 * float(np.mean(np.argmax(outputs[first], axis=-1) == dataset.labels[:n]))
    elif metric == "fp32_agreement":
        value = 100.0 * float(np.mean(np.argmax(outputs[first], axis=-1) == np.argmax(fp32[first][:n], axis=-1)))
    elif metric == "cosine_similarity":
        ref = dataset.references.get(first)
        value = cosine_score(np.asarray(outputs[first]), np.asarray(fp32[first][:n] if ref is None else ref[:n]))
    else:
        num = den = 0.0
        for name in output_names:
            ref = dataset.references.get(name)
            ref = np.asarray(fp32[name][:n] if ref is None else ref[:n], dtype=np.float64)
            num += float(np.abs(np.asarray(outputs[name], dtype=np.float64) - ref).sum())
            den += float(np.abs(ref).sum())
        value = 100.0 * max(0.0, 1.0 - num / max(den, 1e-12))
    return Score(metric, value, max_abs, max_rel)


def drift_profile(fp32: dict[str, np.ndarray], inputs: dict[str, np.ndarray], bins: int = 16) -> dict[str, Any]:
    """Per-tensor reference statistics of FP32 outputs (and inputs) on the eval data."""

    def stats(arr: np.ndarray) -> dict[str, Any]:
        a = np.asarray(arr, dtype=np.float64).ravel()
        if a.size == 0:
            return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "histogram": {"edges": [], "counts": []}}
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            hi = lo + 1e-6
        counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
        r = lambda x: float(f"{x:.6g}")  # noqa: E731 - stable, short JSON numbers
        return {"mean": r(a.mean()), "std": r(a.std()), "min": r(lo), "max": r(hi),
                "histogram": {"edges": [r(e) for e in edges], "counts": [int(c) for c in counts]}}

    samples = next(iter(fp32.values())).shape[0] if fp32 else 0
    return {"samples": int(samples), "bins": bins,
            "outputs": {k: stats(v) for k, v in sorted(fp32.items())},
            "inputs": {k: stats(v) for k, v in sorted(inputs.items())}}
