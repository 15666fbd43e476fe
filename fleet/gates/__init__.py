"""Rollout gates: one module per gate, all registered in GATES.

A gate is written on the command line as ``NAME<THRESHOLD`` (or ``<=``), e.g.
``p95_latency_ms<50``, ``error_rate<0.01``, ``p95_ratio<1.2``. The manager
evaluates every gate of a rollout during and at the end of each wave's bake
time with a ``GateContext`` built from the devices' telemetry (histograms
merged bucket by bucket across devices, never averaged percentiles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from edgeml.errors import UsageError
from edgeml.registry import Registry

GATES = Registry(
    "rollout gate",
    [
        ("failure_rate", "edgeml.fleet.gates.failure_rate:FailureRateGate"),
        ("p95_latency_ms", "edgeml.fleet.gates.p95_latency:P95LatencyGate"),
        ("p95_ratio", "edgeml.fleet.gates.p95_ratio:P95RatioGate"),
        ("error_rate", "edgeml.fleet.gates.error_rate:ErrorRateGate"),
        ("error_rate_delta", "edgeml.fleet.gates.error_rate_delta:ErrorRateDeltaGate"),
        ("drift_psi", "edgeml.fleet.gates.drift_psi:DriftPsiGate"),
    ],
)


@dataclass
class VersionStats:
    """Merged telemetry of one model version over a set of devices."""

    requests: int = 0
    failures: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    devices: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    def p95(self) -> float | None:
        from edgeml.fleet.metrics import quantile

        return quantile(self.buckets, 0.95)


@dataclass
class GateContext:
    wave: int
    wave_devices: int
    failed: int
    committed: int
    new: VersionStats
    old: VersionStats
    drift: Callable[[], tuple[float | None, str]] | None = None   # the new version's drift score (fleet/drift.py)


@dataclass
class GateResult:
    name: str
    ok: bool
    value: float | None
    threshold: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.name, "ok": self.ok, "value": self.value, "threshold": self.threshold, "detail": self.detail}


class Gate:
    name = ""

    def __init__(self, threshold: float, inclusive: bool = False):
        self.threshold = float(threshold)
        self.inclusive = inclusive

    def passes(self, value: float) -> bool:
        return value <= self.threshold if self.inclusive else value < self.threshold

    def measure(self, ctx: GateContext) -> tuple[float | None, str]:
        raise NotImplementedError

    def evaluate(self, ctx: GateContext) -> GateResult:
        value, detail = self.measure(ctx)
        if value is None:   # no data yet is not a breach; the bake time gives it the chance to arrive
            return GateResult(self.name, True, None, self.threshold, f"no data yet ({detail})")
        return GateResult(self.name, self.passes(value), round(value, 6), self.threshold, detail)

    def expression(self) -> str:
        return f"{self.name}{'<=' if self.inclusive else '<'}{self.threshold:g}"


_EXPR = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<)\s*([0-9.]+)\s*(%?)\s*$")


def parse_gate(expr: str) -> Gate:
    m = _EXPR.match(expr)
    if not m:
        raise UsageError(f"gate {expr!r} is not NAME<NUMBER", hint="e.g. --gate p95_latency_ms<50 or --gate error_rate<0.01")
    name, op, number, pct = m.groups()
    value = float(number) / (100.0 if pct else 1.0)
    return GATES.get(name)(value, inclusive=(op == "<="))


def build_gates(exprs: list[str], max_failure_rate: float) -> list[Gate]:
    from edgeml.fleet.gates.failure_rate import FailureRateGate

    gates: list[Gate] = [FailureRateGate(max_failure_rate, inclusive=True)]
    gates += [parse_gate(e) for e in exprs]
    return gates


def evaluate_all(gates: list[Gate], ctx: GateContext) -> list[GateResult]:
    return [g.evaluate(ctx) for g in gates]


def gate_from_dict(d: Mapping[str, Any]) -> Gate:
    return GATES.get(d["name"])(d["threshold"], inclusive=d.get("inclusive", False))


def gate_to_dict(g: Gate) -> dict[str, Any]:
    return {"name": g.name, "threshold": g.threshold, "inclusive": g.inclusive}
