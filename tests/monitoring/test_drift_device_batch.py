"""The device sampler bins in batches (one vectorized pass per batch): same counts as row by row."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgeml.compiler.profile import build_profile
from edgeml.runtime import drift as D

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def digits():
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DIGITS / "digits.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(DIGITS / "eval.npz")["input"]
    live = np.load(DIGITS / "calib.npz")["input"]
    run = lambda a: sess.run(None, {"input": a})[0]  # noqa: E731
    profile = D.parse_profile(build_profile({"logits": run(x)}, {"input": x}, ["logits"]))
    assert profile is not None
    return profile, live, run


def _row_by_row(profile: D.Profile, feats: np.ndarray) -> list[list[int]]:
    total = [np.zeros(c.bins, dtype=np.int64) for c in profile.columns]
    for r in range(feats.shape[0]):
        for acc, c in zip(total, D.bin_counts(profile, feats[r:r + 1])):
            acc += c
    return [list(t) for t in total]


def _block(profile: D.Profile, feats: np.ndarray) -> list[list[int]]:
    counts = D.BlockBinner(profile).counts(feats)
    return [list(counts[j, : c.bins]) for j, c in enumerate(profile.columns)]


def test_block_binning_equals_row_by_row_on_images_and_classes(digits):
    profile, live, run = digits
    feats = D.features(profile, {"input": live}, {"logits": run(live)})
    assert any(c.kind == "categorical" for c in profile.columns)
    assert _block(profile, feats) == _row_by_row(profile, feats)


def test_block_binning_equals_row_by_row_on_edges_nan_inf_and_unknown_classes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    logits = rng.normal(size=(300, 40)).astype(np.float32)        # 40 classes: some share "other"
    profile = D.parse_profile(build_profile({"y": logits}, {"x": x}, ["y"]))
    assert profile is not None
    live = D.features(profile, {"x": rng.normal(scale=2.0, size=(2500, 12))}, {"y": rng.normal(size=(2500, 40))})
    edges = profile.columns[0].edges
    live[: len(edges), 0] = edges                                  # values exactly on the cut points
    live[100:110, 1], live[110:115, 2], live[115:120, 3] = np.nan, np.inf, -np.inf
    live[120:130, -3] = [0, 1, 39, 7.0, 38, 2, 5, 33, 31, 32]      # class ids with and without their own bin
    assert live.shape[0] > D.BLOCK_ROWS                             # more than one vectorized step
    assert _block(profile, live) == _row_by_row(profile, live)


def test_sampler_batches_give_the_sketch_of_each_request_added_alone(digits):
    profile, live, run = digits
    requests = []
    for i, rows in enumerate([1, 3, 80, 1, 17, 64, 2, 1]):         # 80 rows: cut at MAX_ROWS_PER_SAMPLE
        x = live[i * 7: i * 7 + rows]
        requests.append(({"input": x}, {"logits": run(x)} if i != 3 else None))   # one without its outputs
    requests.append(({"input": live[:4, :, :4, :4]}, {"logits": run(live[:4])}))  # other shape: own group
    requests.append(({"input": live[:5]}, {"logits": run(live[:2])}))             # outputs short: skipped
    sampler = D.Sampler(profile, rate=1.0, seed=0)
    for inputs, outputs in requests:
        sampler.offer(inputs, outputs)
    sampler.flush()
    batched = sampler.take()
    sampler.close()
    alone = D.Sketch(profile)
    for inputs, outputs in requests:
        try:
            alone.add(inputs, outputs)
        except ValueError:
            pass                                                    # the old worker skipped it too
    assert batched.n == alone.n == 1 + 3 + 64 + 1 + 17 + 64 + 2 + 1 + 4
    assert [list(c) for c in batched.counts] == [list(c) for c in alone.counts]


def test_sampler_bins_in_its_own_thread_and_counts_what_it_drops(digits):
    profile, live, run = digits
    out = run(live[:1])
    sampler = D.Sampler(profile, rate=1.0, seed=0, queue_size=10)
    for i in range(200):
        sampler.offer({"input": live[i % len(live)][None]}, {"logits": out})
    deadline = time.monotonic() + 10
    seen = D.Sketch(profile)
    while seen.n + seen.dropped < 200 and time.monotonic() < deadline:   # no flush: the worker bins
        seen.merge(sampler.take())
        time.sleep(0.05)
    sampler.close()
    assert seen.n + seen.dropped == 200
    assert seen.dropped >= 200 - 10 * 2        # a full pending list drops (the worker may drain it once)
    assert seen.n >= 10


def test_overhead_benchmark_prints_the_control_arm_and_the_accounted_cost(capsys):
    import json

    from edgeml.benchmarks import drift_overhead

    assert drift_overhead.main(["--models", "mlp", "--rounds", "1", "--seconds", "0.3", "--rate", "1.0", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert set(row["each"]) == {"off", "off again", "on"}          # the A/A control runs beside on and off
    assert row["hook_us"] > 0 and row["accounted_percent"] >= row["worker_cpu_percent"] >= 0
    assert row["rows_sampled"] + row["dropped"] > 0                 # at rate 1 every answered request was offered
