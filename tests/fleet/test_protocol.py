"""Protocol, histograms, gates and wave math: pure unit tests."""

from __future__ import annotations

import json

import pytest

from edgeml.errors import MessageRejected, UsageError
from edgeml.fleet import protocol as P
from edgeml.fleet.gates import GateContext, VersionStats, build_gates, evaluate_all, parse_gate
from edgeml.fleet.waves import assign_waves, parse_duration, parse_rate, parse_waves
from edgeml.fleet.metrics import Histogram, merge, quantile

ART = {"name": "tiny", "version": "1", "url": "http://h/artifacts/" + "a" * 64, "sha256": "a" * 64, "size": 10}


def _desired(**kw):
    return P.desired("dev-1", deployment_id="d1", seq=kw.pop("seq", 1), artifact=kw.pop("artifact", ART), **kw)


def test_desired_roundtrip_validates():
    msg = _desired()
    dev, kind, got = P.validate(P.topic("dev-1", "desired"), P.encode(msg))
    assert (dev, kind, got) == ("dev-1", "desired", msg)


@pytest.mark.parametrize("payload, reason", [
    (b"{not json", "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (json.dumps({"schema_version": 2}).encode(), "schema_version 2"),
    (b"x" * (P.MAX_MESSAGE_BYTES + 1), "over the"),
])
def test_malformed_messages_are_refused_with_reason(payload, reason):
    with pytest.raises(MessageRejected, match=reason):
        P.validate(P.topic("dev-1", "desired"), payload)


def test_schema_errors_name_the_field():
    msg = _desired()
    for mutate, reason in [
        (lambda m: m.pop("seq"), "'seq' is missing"),
        (lambda m: m.update(seq="7"), "'seq' has type str"),
        (lambda m: m.update(seq=True), "'seq' has type bool"),
        (lambda m: m.update(extra=1), "unknown fields"),
        (lambda m: m.update(device_id="other"), "does not match the topic"),
        (lambda m: m["artifact"].update(sha256="zz"), "artifact.sha256"),
        (lambda m: m["artifact"].update(url="file:///etc/passwd"), "artifact.url"),
        (lambda m: m.update(type="event"), "type 'event'"),
    ]:
        bad = json.loads(json.dumps(msg))
        mutate(bad)
        with pytest.raises(MessageRejected, match=reason):
            P.validate(P.topic("dev-1", "desired"), json.dumps(bad).encode())


def test_bad_topics_are_refused():
    for t in ["edgeml/v2/devices/a/desired", "edgeml/v1/devices/a/other", "edgeml/v1/devices/a b/desired", "x"]:
        with pytest.raises(MessageRejected):
            P.parse_topic(t)


def test_signatures(keys):
    msg = P.sign(_desired(), keys["key"])
    assert P.verify(msg, [keys["pub"]], required=True)
    with pytest.raises(MessageRejected, match="not among the trusted keys"):
        P.verify(msg, [keys["other_pub"]], required=True)
    tampered = dict(msg, seq=99)
    with pytest.raises(MessageRejected, match="bad signature"):
        P.verify(tampered, [keys["pub"]], required=True)
    with pytest.raises(MessageRejected, match="unsigned"):
        P.verify(_desired(), [keys["pub"]], required=True)
    assert P.verify(_desired(), [], required=False) is None


def test_labels_and_selectors():
    assert P.parse_labels("site=berlin, hw=rpi4") == {"site": "berlin", "hw": "rpi4"}
    with pytest.raises(UsageError):
        P.parse_labels("site")
    assert P.selector_matches({"hw": "rpi4"}, {"hw": "rpi4", "site": "x"})
    assert not P.selector_matches({"hw": "rpi4"}, {"site": "x"})


def test_histograms_merge_not_average():
    fast, slow = Histogram(), Histogram()
    for _ in range(90):
        fast.observe(0.8)
    for _ in range(10):
        slow.observe(300)
    merged = merge([fast.cumulative(), slow.cumulative()])
    assert merged["+Inf"] == 100
    assert quantile(merged, 0.5) == 1
    assert quantile(merged, 0.95) == 500   # 10% of requests are slow: p95 lands in the slow bucket
    assert quantile({}, 0.95) is None


def test_gates():
    assert parse_gate("p95_latency_ms<50").expression() == "p95_latency_ms<50"
    with pytest.raises(UsageError):
        parse_gate("p95 latency < fast")
    with pytest.raises(Exception, match="unknown rollout gate"):
        parse_gate("nonsense<1")
    slow = Histogram()
    for _ in range(20):
        slow.observe(80)
    ctx = GateContext(wave=0, wave_devices=10, failed=1, committed=9,
                      new=VersionStats(100, 5, slow.cumulative(), 9), old=VersionStats(100, 0, {}, 9))
    results = {r.name: r for r in evaluate_all(build_gates(["p95_latency_ms<50", "error_rate<0.01"], 0.1), ctx)}
    assert results["failure_rate"].ok and results["failure_rate"].value == 0.1   # 10% allowed (<=)
    assert not results["p95_latency_ms"].ok and results["p95_latency_ms"].value == 100
    assert not results["error_rate"].ok
    empty = GateContext(0, 1, 0, 1, VersionStats(), VersionStats())
    assert all(r.ok for r in evaluate_all(build_gates(["p95_ratio<1.2"], 0.1), empty))


def test_waves_and_parsing():
    assert parse_waves("5%,25%,100%") == [0.05, 0.25, 1.0]
    for bad in ("50%,25%,100%", "5%,25%", "abc"):
        with pytest.raises(UsageError):
            parse_waves(bad)
    ids = [f"d{i}" for i in range(500)]
    waves = assign_waves("r1", ids, [0.05, 0.25, 1.0])
    assert [len(w) for w in waves] == [25, 100, 375]
    assert sorted(sum(waves, [])) == sorted(ids)
    assert [len(w) for w in assign_waves("r1", ["a", "b", "c"], [0.05, 0.25, 1.0])] == [1, 1, 1]
    assert parse_rate("10%") == pytest.approx(0.1) and parse_duration("2m") == 120 and parse_duration("250ms") == 0.25
