"""p95_ratio: p95 latency of the new version divided by the old version's (1.2 = 20% slower)."""

from edgeml.fleet.gates import Gate, GateContext


class P95RatioGate(Gate):
    name = "p95_ratio"

    def measure(self, ctx: GateContext):
        new, old = ctx.new.p95(), ctx.old.p95()
        if new is None or old is None or old <= 0:
            have = lambda v: "none yet" if v is None else f"{v} ms"   # noqa: E731
            return None, f"needs both versions' latency (new {have(new)}, old {have(old)})"
        return new / old, f"new p95 {new} ms vs old p95 {old} ms"
