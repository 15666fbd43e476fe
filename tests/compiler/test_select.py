"""Benchmark and selection rules on synthetic candidates (a fake clock, no timing noise)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeml.backends.base import CandidateSpec
from edgeml.compiler.select import benchmark, select


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaved_benchmark_reports_percentiles_and_screens_slow_candidates():
    clock = FakeClock()
    order = []

    def runner(label, cost):
        def run():
            order.append(label)
            clock.now += cost
        return run

    result = benchmark({"fast": runner("fast", 0.001), "mid": runner("mid", 0.002), "slow": runner("slow", 0.5)},
                       seconds=0.5, clock=clock)
    assert result["fast"]["p50"] == 1.0 and result["mid"]["p50"] == 2.0
    assert result["slow"].get("screened") and result["slow"]["rounds"] == 0 and result["slow"]["p50"] == 500.0
    assert result["fast"]["rounds"] >= 5 and result["fast"]["runs"] >= 5 * 50
    last_slow = max(i for i, label in enumerate(order) if label == "slow")
    rounds = order[last_slow + 1:]              # after the warm-ups: only the contenders
    # each candidate's block in a round starts with one untimed settle call
    settle_calls = 2 * result["fast"]["rounds"]
    assert set(rounds) == {"fast", "mid"}
    assert len(rounds) == result["fast"]["runs"] + result["mid"]["runs"] + settle_calls
    # Rotated order: some rounds start with "mid", some with "fast".
    fast_block, mid_block = 1 + 50, 1 + 25   # settle call + timed runs
    starts = {rounds[0], rounds[fast_block + mid_block]}
    assert starts == {"fast", "mid"}


@dataclass
class Cand:
    spec: CandidateSpec
    index: int
    latency: dict | None = None
    recipe: dict = field(default_factory=dict)


def test_fastest_passing_candidate_wins_when_measured():
    a = Cand(CandidateSpec("onnxruntime", "fp32"), 0, {"p50": 3.0})
    b = Cand(CandidateSpec("openvino", "int8"), 1, {"p50": 1.0})
    chosen, why = select([a, b], measured=True, backend_order=["onnxruntime", "openvino"])
    assert chosen is b and why["method"] == "fastest-measured"


def test_static_order_prefers_int8_and_puts_untuned_tvm_last():
    tvm = Cand(CandidateSpec("tvm", "fp32"), 0, recipe={"tuned": False})
    ort32 = Cand(CandidateSpec("onnxruntime", "fp32"), 1)
    ort8 = Cand(CandidateSpec("onnxruntime", "int8"), 2)
    chosen, why = select([tvm, ort32, ort8], measured=False, backend_order=["tvm", "onnxruntime"])
    assert chosen is ort8 and why["method"] == "static-order"
    chosen, _ = select([tvm, ort32], measured=False, backend_order=["tvm", "onnxruntime"])
    assert chosen is ort32
    tuned = Cand(CandidateSpec("tvm", "fp32"), 3, recipe={"tuned": True})
    chosen, _ = select([tuned, ort32], measured=False, backend_order=["tvm", "onnxruntime"])
    assert chosen is tuned


def test_unverified_choice_avoids_int8():
    ov8 = Cand(CandidateSpec("openvino", "int8"), 0)
    ov16 = Cand(CandidateSpec("openvino", "fp16"), 1)
    ov32 = Cand(CandidateSpec("openvino", "fp32"), 2)
    chosen, why = select([ov8, ov16, ov32], measured=False, backend_order=["openvino"], verified=False)
    assert chosen is ov16 and why["method"] == "static-order-unverified"
    chosen, _ = select([ov8, ov32], measured=False, backend_order=["openvino"], verified=False)
    assert chosen is ov32
