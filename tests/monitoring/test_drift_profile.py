"""The reference profile (compiler) and the device sketch (runtime) on the digits example's real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeml.compiler.profile import build_profile
from edgeml.errors import MessageRejected
from edgeml.fleet import protocol as P
from edgeml.runtime import drift as D

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def digits():
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DIGITS / "digits.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(DIGITS / "eval.npz")["input"]
    live = np.load(DIGITS / "calib.npz")["input"]
    run = lambda a: sess.run(None, {"input": a})[0]  # noqa: E731
    return x, run(x), live, run


def test_image_profile_has_per_channel_summary_and_prediction_columns(digits):
    x, y, _, _ = digits
    prof = build_profile({"logits": y}, {"input": x}, ["logits"])
    names = [c["name"] for c in prof["columns"]]
    assert names == ["input:c0:mean", "input:c0:std", "input:centre_row", "input:centre_col",
                     "prediction:class", "prediction:confidence", "prediction:margin"]
    assert prof["version"] == 2 and prof["samples"] == len(x)
    assert prof["layout"]["prediction"]["softmax"] is True     # digits.onnx returns logits
    for c in prof["columns"]:
        assert sum(c["counts"]) == len(x)                       # every reference row in one bin per column
    decile = prof["columns"][0]["counts"]
    assert max(decile) - min(decile) <= 0.05 * len(x)           # quantile bins: about 10 % each
    assert "outputs" in prof and "histogram" in prof["outputs"]["logits"]   # the old summary is kept


def test_tabular_profile_is_per_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)).astype(np.float32)
    prof = D.parse_profile(build_profile({"y": x[:, :1] * 2}, {"x": x}, ["y"]))
    assert prof is not None
    assert prof.column_names()[:3] == ["x[0]", "x[1]", "x[2]"] and prof.column_names()[-1] == "prediction:score"
    assert len(prof.columns) == 31


def test_sketch_counts_match_the_reference_binning(digits):
    x, y, _, run = digits
    profile = D.parse_profile(build_profile({"logits": y}, {"input": x}, ["logits"]))
    sketch = D.Sketch(profile)
    for i in range(0, len(x), 40):          # request by request, as a device sees them
        sketch.add({"input": x[i:i + 40]}, {"logits": run(x[i:i + 40])})
    assert sketch.n == len(x)
    assert [list(c) for c in sketch.counts] == [list(c.counts) for c in profile.columns]


def test_sketches_merge_by_addition(digits):
    x, y, live, run = digits
    profile = D.parse_profile(build_profile({"logits": y}, {"input": x}, ["logits"]))
    a, b, whole = D.Sketch(profile), D.Sketch(profile), D.Sketch(profile)
    a.add({"input": live[:30]}, {"logits": run(live[:30])})
    b.add({"input": live[30:60]}, {"logits": run(live[30:60])})
    whole.add({"input": live[:60]}, {"logits": run(live[:60])})
    a.merge(b)
    assert a.n == 60 and [list(c) for c in a.counts] == [list(c) for c in whole.counts]


def test_sampler_samples_off_the_request_path_at_the_configured_rate(digits):
    x, y, live, run = digits
    profile = D.parse_profile(build_profile({"logits": y}, {"input": x}, ["logits"]))
    sampler = D.Sampler(profile, rate=0.25, seed=1, queue_size=10_000)
    out = run(live[:1])
    for i in range(2000):
        sampler.offer({"input": live[i % len(live)][None]}, {"logits": out})
    sampler.flush()
    sketch = sampler.take()
    assert 400 <= sketch.n <= 600            # Binomial(2000, 0.25): mean 500, sd 19
    assert sampler.take().n == 0             # take() starts a new window
    sampler.close()


def test_older_artifact_profile_turns_sampling_off():
    old = {"samples": 4, "bins": 16, "outputs": {}, "inputs": {}}     # the pre-version-2 shape
    assert D.parse_profile(old) is None
    monitor = D.Monitor(1.0)
    monitor.attach("m", "1", {"name": "m", "version": "1", "drift_profile": old})
    monitor.offer("m", "1", {"x": np.zeros((1, 2))}, {"y": np.zeros((1, 2))})
    assert monitor.windows() == []


def _telemetry(drift_rows):
    return {"schema_version": 1, "type": "telemetry", "device_id": "d1", "ts": 1.0, "interval_s": 1.0,
            "models": [], "active": None, "drift": drift_rows}


def test_protocol_accepts_a_real_sketch_and_refuses_bad_ones(digits):
    x, y, live, run = digits
    profile = D.parse_profile(build_profile({"logits": y}, {"input": x}, ["logits"]))
    sketch = D.Sketch(profile)
    sketch.add({"input": live[:50]}, {"logits": run(live[:50])})
    good = D.wire("digits", "1.0.0", sketch, 0.05)
    P.validate(P.topic("d1", "telemetry"), P.encode(_telemetry([good])))
    bad_rows = {
        "counts do not add up": {**good, "counts": [[1] + c[1:] if i == 0 else c for i, c in enumerate(good["counts"])]},
        "negative count": {**good, "counts": [[-1] + c[1:] for c in good["counts"]]},
        "too many bins": {**good, "counts": [[0] * 40] + good["counts"][1:]},
        "too many columns": {**good, "counts": good["counts"] * 20},
        "rate out of range": {**good, "rate": 1.5},
        "bool as count": {**good, "n": True},
        "unknown field": {**good, "extra": 1},
        "float count": {**good, "counts": [[float(v) for v in c] for c in good["counts"]]},
    }
    for why, row in bad_rows.items():
        raw = json.dumps(_telemetry([row])).encode()
        with pytest.raises(MessageRejected, match="drift"):
            P.validate(P.topic("d1", "telemetry"), raw)
        assert why
    with pytest.raises(MessageRejected):
        P.validate(P.topic("d1", "telemetry"), b'{"schema_version":1,"type":"telemetry","device_id":"d1","ts":1,'
                   b'"interval_s":1,"models":[],"active":null,"drift":[{"name":"m","version":"1","n":1,"dropped":0,'
                   b'"rate":NaN,"counts":[[1]]}]}')
