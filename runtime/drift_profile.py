"""The shape of a drift profile: its layouts and columns, their names, and the manifest JSON read into them.

Split out of runtime/drift.py (which re-exports every name here): the compiler writes these profiles into an
artifact's manifest (edgeml.compiler.profile), the device reads them back with ``parse_profile`` before it
samples anything. A malformed profile is one ``ProfileError`` naming the field; every count is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PROFILE_VERSION = 2
MAX_COLUMNS = 80          # columns per profile (inputs + prediction): bounds the telemetry message
MAX_BINS = 33             # bins per column (32 categories + "other", or <= 32 numeric bins)
MAX_TABULAR = 64          # features kept of one 2-D input (the first ones)
MAX_CHANNELS = 16         # channels summarized of one image/tensor input (the first ones)
MAX_CLASSES = 32          # classes kept by name; the rest share the "other" bin
MAX_COUNT = 2 ** 53


class ProfileError(ValueError):
    """A drift profile that does not follow this module's shape (message names the field)."""


@dataclass(frozen=True)
class InputLayout:
    tensor: str
    layout: str                 # "tabular" | "scalar" | "image"
    channel_axis: int = 1       # image only: axis of the channels in the batched tensor
    size: int = 1               # tabular: features kept; image: channels kept

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layout": self.layout, "channel_axis": self.channel_axis, "size": self.size}


@dataclass(frozen=True)
class PredictionLayout:
    output: str
    kind: str                   # "classifier" | "regressor"
    classes: int = 0            # classifier: width of the output
    softmax: bool = False       # classifier: the output is logits (apply softmax for confidence)
    categories: tuple[int, ...] = ()   # classifier: class ids with their own bin (the rest: "other")

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "kind": self.kind, "classes": self.classes, "softmax": self.softmax,
                "categories": list(self.categories)}


@dataclass(frozen=True)
class Column:
    name: str
    group: str                  # "input" | "prediction"
    kind: str                   # "numeric" (edges: upper bounds, last bin open) | "categorical"
    edges: tuple[float, ...]    # numeric: sorted interior cut points; bins = len(edges) + 1
    counts: tuple[int, ...]     # reference counts per bin

    @property
    def bins(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class Profile:
    samples: int
    inputs: tuple[InputLayout, ...]
    prediction: PredictionLayout | None
    columns: tuple[Column, ...]

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


# ----------------------------------------------------------------------------- column names
def input_feature_names(lay: InputLayout) -> list[str]:
    if lay.layout == "scalar":
        return [f"{lay.tensor}"]
    if lay.layout == "tabular":
        return [f"{lay.tensor}[{i}]" for i in range(lay.size)]
    names = [f"{lay.tensor}:c{c}:{stat}" for c in range(lay.size) for stat in ("mean", "std")]
    return names + [f"{lay.tensor}:centre_row", f"{lay.tensor}:centre_col"]


def prediction_feature_names(pred: PredictionLayout) -> list[str]:
    if pred.kind == "classifier":
        return ["prediction:class", "prediction:confidence", "prediction:margin"]
    return ["prediction:score"]


# ----------------------------------------------------------------------------- profile (manifest JSON)
def parse_profile(obj: object, where: str = "drift_profile") -> Profile | None:
    """The typed profile of a manifest's ``drift_profile``; None for an older artifact (no ``version`` 2
    columns: drift is then not sampled); ProfileError naming the field for a malformed one."""
    if not isinstance(obj, dict) or obj.get("version") != PROFILE_VERSION:
        return None
    samples = _int(obj.get("samples"), f"{where}.samples")
    layouts = obj.get("layout")
    if not isinstance(layouts, dict):
        raise ProfileError(f"{where}.layout must be an object")
    inputs = tuple(_input_layout(v, f"{where}.layout.inputs[{i}]") for i, v in enumerate(_list(layouts.get("inputs"), f"{where}.layout.inputs")))
    pred_obj = layouts.get("prediction")
    pred = None if pred_obj is None else _prediction_layout(pred_obj, f"{where}.layout.prediction")
    cols = _list(obj.get("columns"), f"{where}.columns")
    if len(cols) > MAX_COLUMNS:
        raise ProfileError(f"{where}.columns holds {len(cols)} columns; the limit is {MAX_COLUMNS}")
    columns = tuple(_column(c, f"{where}.columns[{i}]") for i, c in enumerate(cols))
    profile = Profile(samples, inputs, pred, columns)
    expected = [n for lay in inputs for n in input_feature_names(lay)] + (prediction_feature_names(pred) if pred else [])
    if profile.column_names() != expected:
        raise ProfileError(f"{where}.columns do not match its layout (expected {expected[:4]}...)")
    return profile


def _int(v: object, where: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ProfileError(f"{where} must be an integer from {low} to {high}, got {str(v)[:40]!r}")
    return v


def _list(v: object, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise ProfileError(f"{where} must be a list")
    return v


def _str(v: object, where: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 256:
        raise ProfileError(f"{where} must be a string of 1-256 characters")
    return v


def _input_layout(v: object, where: str) -> InputLayout:
    if not isinstance(v, dict) or v.get("layout") not in ("tabular", "scalar", "image"):
        raise ProfileError(f"{where}.layout must be tabular, scalar or image")
    limit = MAX_TABULAR if v["layout"] == "tabular" else MAX_CHANNELS
    return InputLayout(_str(v.get("tensor"), f"{where}.tensor"), v["layout"],
                       _int(v.get("channel_axis", 1), f"{where}.channel_axis", 1, 31), _int(v.get("size", 1), f"{where}.size", 1, limit))


def _prediction_layout(v: object, where: str) -> PredictionLayout:
    if not isinstance(v, dict) or v.get("kind") not in ("classifier", "regressor"):
        raise ProfileError(f"{where}.kind must be classifier or regressor")
    cats = tuple(_int(c, f"{where}.categories[]", 0, 1 << 31) for c in _list(v.get("categories", []), f"{where}.categories"))
    if len(cats) > MAX_CLASSES:
        raise ProfileError(f"{where}.categories holds {len(cats)} classes; the limit is {MAX_CLASSES}")
    return PredictionLayout(_str(v.get("output"), f"{where}.output"), v["kind"],
                            _int(v.get("classes", 0), f"{where}.classes", 0, 1 << 31), bool(v.get("softmax", False)), cats)


def _column(v: object, where: str) -> Column:
    if not isinstance(v, dict) or v.get("kind") not in ("numeric", "categorical") or v.get("group") not in ("input", "prediction"):
        raise ProfileError(f"{where} needs kind numeric|categorical and group input|prediction")
    edges = tuple(_list(v.get("edges", []), f"{where}.edges"))
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges):
        raise ProfileError(f"{where}.edges must be finite numbers")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ProfileError(f"{where}.edges must increase strictly")
    counts = tuple(_int(c, f"{where}.counts[]") for c in _list(v.get("counts"), f"{where}.counts"))
    if not 1 <= len(counts) <= MAX_BINS or (v["kind"] == "numeric" and len(counts) != len(edges) + 1):
        raise ProfileError(f"{where}.counts must hold 1-{MAX_BINS} bins (numeric: one more than its edges)")
    return Column(_str(v.get("name"), f"{where}.name"), v["group"], v["kind"], tuple(float(e) for e in edges), counts)
