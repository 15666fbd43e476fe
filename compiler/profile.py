"""The reference drift profile, built at compile time from the eval (or calibration) data.

Written into the manifest's ``drift_profile`` (docs/artifact.md, docs/monitoring.md). Per
input: one column per feature of a 2-D (tabular) tensor, or for an image/tensor of rank >= 3
the mean and standard deviation of each channel plus the intensity centre (row, col); and the
prediction distribution of the first output: predicted class frequencies, top-1 confidence and
top1-top2 margin for a classifier, the score for a regressor. Every column is one scalar per
sample, binned on the reference's deciles (``bins`` quantile bins; ties merge bins), so each
reference bin holds about the same share: the binning PSI and chi-square tests work best on.
The features are computed by ``edgeml.runtime.drift`` - the same code the device runs.

The old tensor-level summary (``samples``, ``bins``, ``inputs``, ``outputs``) stays in the
profile for readers of older versions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from edgeml.runtime import drift as D

DEFAULT_BINS = 10


def build_profile(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray], output_names: list[str],
                  *, source: str = "eval", bins: int = DEFAULT_BINS) -> dict[str, Any]:
    from edgeml.compiler.evaluate import drift_profile as tensor_summary

    out: dict[str, Any] = dict(tensor_summary(dict(outputs), dict(inputs), bins=16))
    layouts = _input_layouts(inputs)
    pred = _prediction_layout(outputs, output_names)
    # drop trailing inputs past the column budget (rather than one huge telemetry message)
    budget = D.MAX_COLUMNS - (len(D.prediction_feature_names(pred)) if pred else 0)
    kept: list[D.InputLayout] = []
    for lay in layouts:
        if len(D.input_feature_names(lay)) <= budget:
            kept.append(lay)
            budget -= len(D.input_feature_names(lay))
    shell = D.Profile(0, tuple(kept), pred, ())
    feats = D.features(shell, inputs, outputs)
    names = [n for lay in kept for n in D.input_feature_names(lay)] + (D.prediction_feature_names(pred) if pred else [])
    columns = [_column(name, feats[:, j], pred, bins) for j, name in enumerate(names)]
    out.update({"version": D.PROFILE_VERSION, "source": source, "samples": int(feats.shape[0]),
                "layout": {"inputs": [lay.to_dict() for lay in kept], "prediction": pred.to_dict() if pred else None},
                "columns": columns})
    D.parse_profile(out)   # what the device will read: refuse here, at compile time, if it would not
    return out


def _input_layouts(inputs: Mapping[str, np.ndarray]) -> list[D.InputLayout]:
    layouts = []
    for name, arr in sorted(inputs.items()):
        a = np.asarray(arr)
        if a.dtype.kind not in "biuf" or a.ndim == 0 or a.shape[0] == 0:
            continue   # strings / bools / empty: nothing to bin
        if a.ndim == 1:
            layouts.append(D.InputLayout(name, "scalar"))
        elif a.ndim == 2:
            layouts.append(D.InputLayout(name, "tabular", size=min(a.shape[1], D.MAX_TABULAR)))
        else:
            axis = _channel_axis(a.shape)
            layouts.append(D.InputLayout(name, "image", channel_axis=axis, size=min(a.shape[axis], D.MAX_CHANNELS)))
    return layouts


def _channel_axis(shape: tuple[int, ...]) -> int:
    """NCHW unless the tensor is clearly channels-last (NHWC: a small last axis after two large ones)."""
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return 3
    return 1


def _prediction_layout(outputs: Mapping[str, np.ndarray], output_names: list[str]) -> D.PredictionLayout | None:
    if not output_names or output_names[0] not in outputs:
        return None
    name = output_names[0]
    y = np.asarray(outputs[name], dtype=np.float64)
    if y.ndim == 0 or y.shape[0] == 0 or not np.all(np.isfinite(y)):
        return None
    flat = y.reshape(y.shape[0], -1)
    if y.ndim == 2 and flat.shape[1] >= 2:
        probs = bool(np.all(flat >= 0) and np.allclose(flat.sum(axis=1), 1.0, atol=1e-3))
        freq = np.bincount(np.argmax(flat, axis=1), minlength=flat.shape[1])
        order = sorted(range(flat.shape[1]), key=lambda c: (-int(freq[c]), c))   # most frequent classes first
        cats = tuple(sorted(order[: D.MAX_CLASSES - 1])) if flat.shape[1] >= D.MAX_CLASSES else tuple(range(flat.shape[1]))
        return D.PredictionLayout(name, "classifier", classes=int(flat.shape[1]), softmax=not probs, categories=cats)
    return D.PredictionLayout(name, "regressor")


def _column(name: str, values: np.ndarray, pred: D.PredictionLayout | None, bins: int) -> dict[str, Any]:
    group = "prediction" if name.startswith("prediction:") else "input"
    v = values[np.isfinite(values)]
    if name == "prediction:class":
        assert pred is not None
        col = D.Column(name, group, "categorical", (), tuple([0] * (len(pred.categories) + 1)))
        counts = np.bincount(D.bin_index(col, v, pred), minlength=col.bins)
        return {"name": name, "group": group, "kind": "categorical", "edges": [],
                "counts": [int(c) for c in counts], "categories": list(pred.categories)}
    edges = _quantile_edges(v, bins)
    col = D.Column(name, group, "numeric", edges, tuple([0] * (len(edges) + 1)))
    counts = np.bincount(D.bin_index(col, v), minlength=col.bins)
    r = lambda x: float(f"{x:.6g}")  # noqa: E731 - short stable JSON numbers
    return {"name": name, "group": group, "kind": "numeric", "edges": list(edges), "counts": [int(c) for c in counts],
            "mean": r(float(v.mean())) if v.size else 0.0, "std": r(float(v.std())) if v.size else 0.0}


def _quantile_edges(v: np.ndarray, bins: int) -> tuple[float, ...]:
    """Interior cut points at the reference's 1/bins ... (bins-1)/bins quantiles, rounded for JSON and
    de-duplicated (a discrete feature gets fewer, wider bins)."""
    if v.size == 0:
        return (0.0,)
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    edges = sorted({float(f"{q:.9g}") for q in qs})
    return tuple(edges) if edges else (float(v[0]),)
