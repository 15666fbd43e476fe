"""Drift sketches on the device: the reference profile's columns, live counts, sampled off the hot path.

A *column* is one scalar per sample (row) of a request: a tabular feature, a per-channel
mean or standard deviation of an image, its centre of mass, the predicted class, the
confidence or margin of a classifier, the score of a regressor. ``features()`` computes
them the same way for the compiler's reference data (edgeml.compiler.profile) and for live
requests, so the reference counts and the live counts are on the same bins.

``Sketch`` holds one integer count per (column, bin): it is mergeable (add the counts) and
bounded (at most ``MAX_COLUMNS`` x ``MAX_BINS`` integers, whatever the traffic).
``Sampler`` is what a server calls per request: one random draw on the request path; a chosen
request's arrays (references, no copy) join a bounded pending list. A worker thread wakes a few
times a second and bins the whole list at once (``BlockBinner``: one vectorized pass over a
[rows, columns] block instead of ~100 small numpy calls per row); it caps its own share of time
(``MAX_DUTY``), so under heavy traffic the list fills and further samples are dropped and
counted rather than slowing the server. numpy only: a device installs nothing else.
The profile's shape (layouts, columns, their names) and its reading from a manifest live in
runtime/drift_profile.py; every name there is importable from here too.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgeml.runtime.drift_profile import (
    MAX_BINS as MAX_BINS, MAX_CHANNELS as MAX_CHANNELS, MAX_CLASSES as MAX_CLASSES, MAX_COLUMNS as MAX_COLUMNS,
    MAX_COUNT as MAX_COUNT, MAX_TABULAR as MAX_TABULAR, PROFILE_VERSION as PROFILE_VERSION, Column as Column,
    InputLayout as InputLayout, PredictionLayout as PredictionLayout, Profile as Profile,
    ProfileError as ProfileError, input_feature_names as input_feature_names, parse_profile as parse_profile,
    prediction_feature_names as prediction_feature_names)

log = logging.getLogger("edgeml.runtime.drift")

MAX_ROWS_PER_SAMPLE = 64  # rows binned of one sampled request (a huge batch is cut)
DEFAULT_RATE = 0.05       # share of requests sampled (benchmarks/drift_overhead.py measures the cost)
QUEUE_SIZE = 1024         # sampled requests waiting for the worker; more are dropped (and counted)
MAX_PENDING_BYTES = 16 << 20   # ... and the bytes of their arrays (a big request can be kept only alone)
BATCH_INTERVAL_S = 0.25   # the worker bins what is pending this often (one GIL-holding burst, not one per sample)
MAX_DUTY = 0.02           # the worker's CPU time stays under this share of wall time; excess samples are dropped
BLOCK_ROWS = 1024         # rows per vectorized binning step: bounds its [rows, columns, edges] temporary


# ----------------------------------------------------------------------------- features
def input_features(lay: InputLayout, x: np.ndarray) -> np.ndarray:
    """(rows, columns) float64 for one input tensor, first axis = rows."""
    a = np.asarray(x)
    rows = a.shape[0] if a.ndim else 1
    a = a.reshape(rows, -1) if lay.layout != "image" else a
    a = a.astype(np.float64, copy=False)
    if lay.layout == "scalar":
        return a.reshape(rows, -1)[:, :1]
    if lay.layout == "tabular":
        return a[:, : lay.size]
    chans = np.moveaxis(a, lay.channel_axis, 1)[:, : lay.size]
    flat = chans.reshape(rows, chans.shape[1], -1)
    stats = np.stack([flat.mean(axis=2), flat.std(axis=2)], axis=2).reshape(rows, -1)
    return np.concatenate([stats, _centre_of_mass(chans)], axis=1)


def _centre_of_mass(chans: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (row, col) of the last two axes, in [0, 1]: a translated image moves it."""
    rows = chans.shape[0]
    if chans.ndim < 4:
        return np.full((rows, 2), 0.5)
    img = chans.reshape(rows, -1, chans.shape[-2], chans.shape[-1]).sum(axis=1)
    w = img - img.reshape(rows, -1).min(axis=1)[:, None, None]
    total = w.reshape(rows, -1).sum(axis=1)
    h, wd = img.shape[1], img.shape[2]
    r = np.linspace(0.0, 1.0, h) if h > 1 else np.full(1, 0.5)
    c = np.linspace(0.0, 1.0, wd) if wd > 1 else np.full(1, 0.5)
    safe = np.where(total > 0, total, 1.0)
    cr = (w.sum(axis=2) * r).sum(axis=1) / safe
    cc = (w.sum(axis=1) * c).sum(axis=1) / safe
    return np.stack([np.where(total > 0, cr, 0.5), np.where(total > 0, cc, 0.5)], axis=1)


def prediction_features(pred: PredictionLayout, y: np.ndarray) -> np.ndarray:
    """(rows, columns): class id (as float), confidence, margin; or the score (row mean) of a regressor."""
    a = np.asarray(y, dtype=np.float64)
    rows = a.shape[0] if a.ndim else 1
    a = a.reshape(rows, -1)
    if pred.kind != "classifier":
        return a.mean(axis=1, keepdims=True)
    p = a
    if pred.softmax:
        z = np.exp(a - a.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] >= 2 else np.concatenate([np.zeros((rows, 1)), p], axis=1)
    return np.stack([np.argmax(a, axis=1).astype(np.float64), top2[:, 1], top2[:, 1] - top2[:, 0]], axis=1)


def features(profile: Profile, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None,
             max_rows: int | None = None) -> np.ndarray:
    """(rows, len(columns)) for one request; NaN where a tensor is missing (that column is not counted)."""
    parts: list[np.ndarray] = []
    rows = _rows(inputs, outputs)
    if max_rows is not None:
        rows = min(rows, max_rows)
    for lay in profile.inputs:
        width = len(input_feature_names(lay))
        x = inputs.get(lay.tensor)
        parts.append(input_features(lay, np.asarray(x)[:rows]) if x is not None else np.full((rows, width), np.nan))
    if profile.prediction is not None:
        pred = profile.prediction
        width = len(prediction_feature_names(pred))
        y = (outputs or {}).get(pred.output)
        parts.append(prediction_features(pred, np.asarray(y)[:rows]) if y is not None else np.full((rows, width), np.nan))
    return np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0))


def _rows(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None) -> int:
    for arrays in (inputs, outputs or {}):
        for a in arrays.values():
            a = np.asarray(a)
            return int(a.shape[0]) if a.ndim else 1
    return 0


def bin_index(column: Column, values: np.ndarray, pred: PredictionLayout | None = None) -> np.ndarray:
    """The bin of each value: numeric ``(-inf, e0], (e0, e1], ..., (e_last, inf)``; categorical: its
    category's position, the last bin ("other") for any class without its own bin."""
    if column.kind == "categorical":
        cats = pred.categories if pred is not None else ()
        lookup = {c: i for i, c in enumerate(cats)}
        other = column.bins - 1
        return np.array([lookup.get(int(v), other) for v in values], dtype=np.int64)
    return np.searchsorted(np.asarray(column.edges, dtype=np.float64), values, side="left").astype(np.int64)


def bin_counts(profile: Profile, feats: np.ndarray) -> list[np.ndarray]:
    """Counts per column for a (rows, columns) feature matrix; NaN/inf rows of a column are skipped.
    The column-by-column reference: ``BlockBinner`` gives the same counts in one vectorized pass."""
    out = []
    for j, col in enumerate(profile.columns):
        v = feats[:, j]
        v = v[np.isfinite(v)]
        idx = bin_index(col, v, profile.prediction)
        out.append(np.bincount(idx, minlength=col.bins)[: col.bins].astype(np.int64))
    return out


class BlockBinner:
    """``bin_counts`` for a whole [rows, columns] block at once, as one (columns, MAX_BINS) matrix.

    A numeric value's bin is ``searchsorted(edges, v, side="left")``, i.e. the number of edges
    strictly below it: here one comparison of the block with every column's edges (padded with
    +inf, which no finite value exceeds) summed over the edges. A categorical value's bin is its
    category's position (the last one wins, like the reference's dict), else "other". Non-finite
    values and positions past a column's bins are not counted, exactly as in ``bin_counts``."""

    def __init__(self, profile: Profile):
        cols = profile.columns
        self.columns = len(cols)
        self.bins = np.array([c.bins for c in cols], dtype=np.int64)
        width = max([len(c.edges) for c in cols if c.kind == "numeric"] + [1])
        self.edges = np.full((self.columns, width), np.inf)
        for j, c in enumerate(cols):
            if c.kind == "numeric":
                self.edges[j, : len(c.edges)] = c.edges
        self.categorical = np.array([c.kind == "categorical" for c in cols], dtype=bool)
        lookup = {c: i for i, c in enumerate(profile.prediction.categories if profile.prediction else ())}
        self.cat_keys = np.array(list(lookup), dtype=np.float64)
        self.cat_pos = np.array(list(lookup.values()), dtype=np.int64)
        self.offsets = np.arange(self.columns, dtype=np.int64) * MAX_BINS

    def counts(self, feats: np.ndarray) -> np.ndarray:
        out = np.zeros(self.columns * MAX_BINS, dtype=np.int64)
        for start in range(0, feats.shape[0], BLOCK_ROWS):
            block = feats[start:start + BLOCK_ROWS]
            idx = (self.edges[None, :, :] < block[:, :, None]).sum(axis=2, dtype=np.int64)
            if self.categorical.any():
                idx[:, self.categorical] = self._categories(block[:, self.categorical])
            valid = np.isfinite(block) & (idx < self.bins[None, :])
            out += np.bincount((idx + self.offsets[None, :])[valid], minlength=out.size)
        return out.reshape(self.columns, MAX_BINS)

    def _categories(self, values: np.ndarray) -> np.ndarray:
        other = np.broadcast_to(self.bins[self.categorical] - 1, values.shape)
        if self.cat_keys.size == 0:
            return np.array(other)
        match = np.trunc(values)[..., None] == self.cat_keys      # trunc: the reference's int(v)
        return np.where(match.any(axis=-1), self.cat_pos[match.argmax(axis=-1)], other)


# ----------------------------------------------------------------------------- the live sketch
@dataclass
class Sketch:
    """Counts per (column, bin) of the samples seen since the last ``take``; mergeable by addition."""

    profile: Profile
    n: int = 0
    dropped: int = 0
    counts: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [np.zeros(c.bins, dtype=np.int64) for c in self.profile.columns]

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None,
            binner: BlockBinner | None = None) -> None:
        self.add_features(features(self.profile, inputs, outputs, MAX_ROWS_PER_SAMPLE), binner)

    def add_features(self, feats: np.ndarray, binner: BlockBinner | None = None) -> None:
        """Count a (rows, columns) block (the columns of ``features``)."""
        counts = (binner or BlockBinner(self.profile)).counts(feats)
        for acc, c in zip(self.counts, counts):
            acc += c[: acc.size]
        self.n += feats.shape[0]

    def merge(self, other: "Sketch") -> None:
        for acc, c in zip(self.counts, other.counts):
            acc += c
        self.n += other.n
        self.dropped += other.dropped


def wire(name: str, version: str, sketch: Sketch, rate: float) -> dict[str, Any]:
    """The telemetry ``drift`` row of one model version (fleet/protocol.py validates it)."""
    return {"name": name, "version": version, "n": int(sketch.n), "dropped": int(sketch.dropped),
            "rate": float(rate), "counts": [[int(x) for x in c] for c in sketch.counts]}


WIRE_FIELDS: dict[str, type | tuple[type, ...]] = {"name": str, "version": str, "n": int, "dropped": int,
                                                "rate": (int, float), "counts": list}


def wire_problem(row: object) -> str | None:
    """Why a received ``drift`` row is not acceptable (None when it is): exact fields, bounded sizes,
    finite numbers, and every column's counts adding up to ``n`` (each sample lands in one bin per
    column; a column whose tensor was missing counts nothing, so its sum may be 0)."""
    if not isinstance(row, dict):
        return "is not an object"
    if set(row) != set(WIRE_FIELDS):
        return f"must hold exactly the fields {sorted(WIRE_FIELDS)}"
    for k, t in WIRE_FIELDS.items():
        if isinstance(row[k], bool) or not isinstance(row[k], t):
            return f"field {k!r} has the wrong type"
    if not 0 < len(row["name"]) <= 128 or not 0 < len(row["version"]) <= 128:
        return "name and version must be 1-128 characters"
    if not 0 <= row["n"] <= MAX_COUNT or not 0 <= row["dropped"] <= MAX_COUNT:
        return "n and dropped must be integers from 0 to 2**53"
    if not (math.isfinite(row["rate"]) and 0 < row["rate"] <= 1):
        return "rate must be a number in (0, 1]"
    counts = row["counts"]
    if len(counts) > MAX_COLUMNS:
        return f"counts holds {len(counts)} columns; the limit is {MAX_COLUMNS}"
    for i, col in enumerate(counts):
        if not isinstance(col, list) or not 1 <= len(col) <= MAX_BINS:
            return f"counts[{i}] must be a list of 1-{MAX_BINS} bins"
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_COUNT for c in col):
            return f"counts[{i}] must hold non-negative integers"
        if sum(col) not in (0, row["n"]):
            return f"counts[{i}] adds up to {sum(col)}, not n={row['n']}"
    return None


Item = tuple[Mapping[str, Any], Mapping[str, Any] | None]


class Sampler:
    """Per model version: ``offer`` on the request path (one random draw; a list append when chosen), a
    worker thread bins the pending requests in batches; ``take`` hands the window's sketch over and
    starts a new one. Pending samples are binned within ``BATCH_INTERVAL_S`` (longer when the duty
    cap stretches the pause), so they may land in the next window."""

    def __init__(self, profile: Profile, rate: float = DEFAULT_RATE, *, seed: int | None = None,
                 queue_size: int = QUEUE_SIZE):
        if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
            raise ValueError(f"drift sampling rate {rate!r} must be in (0, 1]")
        self.profile = profile
        self.rate = float(rate)
        self._random = random.Random(seed).random
        self._limit = queue_size
        self._binner = BlockBinner(profile)
        self._lock = threading.Lock()          # pending list and sketch: held for an append or a swap only
        self._busy = threading.Lock()          # one binning pass at a time (the worker or flush)
        self._pending: list[Item] = []
        self._pending_bytes = 0
        self._sketch = Sketch(profile)
        self._stop = threading.Event()
        self.busy_s = 0.0                      # CPU seconds spent binning (benchmarks/drift_overhead.py prints it)
        self._thread = threading.Thread(target=self._work, name="edgeml-drift", daemon=True)
        self._thread.start()

    def offer(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None) -> None:
        """Hot path: a random draw; when chosen, references to the decoded arrays (no copy)."""
        if self._random() >= self.rate:
            return
        size = _nbytes(inputs) + _nbytes(outputs)
        with self._lock:
            if self._pending and (len(self._pending) >= self._limit
                                  or self._pending_bytes + size > MAX_PENDING_BYTES):
                self._sketch.dropped += 1
                return
            self._pending.append((inputs, outputs))
            self._pending_bytes += size

    def _work(self) -> None:
        pause = BATCH_INTERVAL_S
        while not self._stop.wait(pause):
            with self._busy:
                spent = time.thread_time()
                self._bin_pending()
                spent = time.thread_time() - spent
                self.busy_s += spent
            # the duty cap: after ``spent`` seconds of work, rest long enough that work stays <= MAX_DUTY
            pause = max(BATCH_INTERVAL_S, spent * (1.0 / MAX_DUTY - 1.0))

    def _bin_pending(self) -> None:
        with self._lock:
            items, self._pending, self._pending_bytes = self._pending, [], 0
        if not items:
            return
        part = Sketch(self.profile)
        for group in _groups(self.profile, items):
            try:
                part.add_features(_batch_features(self.profile, group), self._binner)
            except Exception:  # noqa: BLE001 - one odd request must not lose the batch: bin one by one
                for item in group:
                    try:
                        part.add(*item, binner=self._binner)
                    except Exception as exc:  # noqa: BLE001 - an odd request must not stop sampling
                        log.debug("drift sample skipped: %s", exc)
        with self._lock:
            self._sketch.merge(part)

    def flush(self, timeout: float = 5.0) -> None:
        """Bin what is pending now, in the caller's thread (tests and benchmarks)."""
        if self._busy.acquire(timeout=timeout):
            try:
                self._bin_pending()
            finally:
                self._busy.release()

    def take(self) -> Sketch:
        with self._lock:
            sketch, self._sketch = self._sketch, Sketch(self.profile)
        return sketch

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._pending, self._pending_bytes = [], 0


def _nbytes(arrays: Mapping[str, Any] | None) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values()) if arrays else 0


def _tensors(profile: Profile) -> tuple[list[str], str | None]:   # the inputs and the output profiled
    return [lay.tensor for lay in profile.inputs], profile.prediction.output if profile.prediction else None


def _groups(profile: Profile, items: list[Item]) -> list[list[Item]]:
    """Requests whose profiled tensors have the same per-row shapes (and are present alike): each group
    can be stacked along the rows and go through ``features`` once."""
    names, out = _tensors(profile)
    groups: dict[tuple[Any, ...], list[Item]] = {}
    for inputs, outputs in items:
        arrays = [inputs.get(n) for n in names] + [(outputs or {}).get(out) if out else None]
        key = tuple(None if a is None else np.shape(a)[1:] for a in arrays)
        groups.setdefault(key, []).append((inputs, outputs))
    return list(groups.values())


def _batch_features(profile: Profile, group: list[Item]) -> np.ndarray:
    """``features`` of each request (its first MAX_ROWS_PER_SAMPLE rows), stacked, in one call: the
    columns are computed row by row, so stacking the rows first gives the same values."""
    names, out = _tensors(profile)
    cuts = [min(_rows(i, o), MAX_ROWS_PER_SAMPLE) for i, o in group]
    first_in, first_out = group[0]

    def stack(get: Any) -> np.ndarray:
        parts = [np.asarray(get(item))[:rows] for item, rows in zip(group, cuts)]
        if any(p.shape[0] != rows for p, rows in zip(parts, cuts)):
            raise ValueError("a tensor holds fewer rows than the request")   # features() would refuse it too
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    inputs = {n: stack(lambda it, n=n: it[0][n]) for n in names if first_in.get(n) is not None}
    outputs = ({out: stack(lambda it: (it[1] or {})[out])}
               if out is not None and (first_out or {}).get(out) is not None else None)
    if not inputs and not outputs:      # nothing profiled in these requests: rows seen, nothing counted
        return np.full((sum(cuts), len(profile.columns)), np.nan)
    return features(profile, inputs, outputs)


def sampler_for(manifest: Mapping[str, Any], rate: float = DEFAULT_RATE) -> Sampler | None:
    """A sampler for a loaded artifact's manifest, or None when it carries no version-2 profile."""
    try:
        profile = parse_profile(manifest.get("drift_profile"))
    except ProfileError as exc:
        log.warning("drift sampling off for %s@%s: %s", manifest.get("name"), manifest.get("version"), exc)
        return None
    if profile is None or not profile.columns:
        log.info("drift sampling off for %s@%s: its artifact has no per-feature profile (compiled by an older"
                 " edgeml)", manifest.get("name"), manifest.get("version"))
        return None
    return Sampler(profile, rate)


class Monitor:
    """The drift samplers of one device, per served (name, version); ``windows()`` drains them into
    telemetry rows. Versions without a version-2 profile are not sampled (older artifacts)."""

    def __init__(self, rate: float = DEFAULT_RATE):
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate <= 1):
            raise ValueError(f"drift sampling rate {rate!r} must be in (0, 1]")
        self.rate = float(rate)
        self._samplers: dict[tuple[str, str], Sampler] = {}
        self._retired: list[tuple[str, str, Sampler]] = []
        self._lock = threading.Lock()

    def attach(self, name: str, version: str, manifest: Mapping[str, Any]) -> None:
        sampler = sampler_for(manifest, self.rate)
        with self._lock:
            old = self._samplers.pop((name, version), None)
            if sampler is not None:
                self._samplers[(name, version)] = sampler
            if old is not None:
                self._retired.append((name, version, old))

    def detach(self, name: str, version: str) -> None:
        """Stop sampling a version; its last window still goes out with the next ``windows()``."""
        with self._lock:
            old = self._samplers.pop((name, version), None)
            if old is not None:
                self._retired.append((name, version, old))

    def offer(self, name: str, version: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None) -> None:
        sampler = self._samplers.get((name, version))
        if sampler is not None:
            sampler.offer(inputs, outputs)

    def windows(self) -> list[dict[str, Any]]:
        """One telemetry row per sampled version with samples (or drops) since the last call."""
        with self._lock:
            live = [(n, v, s) for (n, v), s in self._samplers.items()]
            retired, self._retired = self._retired, []
        rows = []
        for name, version, sampler in live + retired:
            sketch = sampler.take()
            if sketch.n or sketch.dropped:
                rows.append(wire(name, version, sketch, sampler.rate))
        for _, _, sampler in retired:
            sampler.close()
        return rows

    def busy_s(self) -> float:
        """CPU seconds the live samplers' workers spent binning."""
        return sum(s.busy_s for s in list(self._samplers.values()))

    def flush(self) -> None:
        for sampler in list(self._samplers.values()):
            sampler.flush()

    def close(self) -> None:
        with self._lock:
            samplers = list(self._samplers.values()) + [s for _, _, s in self._retired]
            self._samplers, self._retired = {}, []
        for sampler in samplers:
            sampler.close()
