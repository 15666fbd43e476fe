"""error_rate_delta: new version's error rate minus the old version's."""

from edgeml.fleet.gates import Gate, GateContext


class ErrorRateDeltaGate(Gate):
    name = "error_rate_delta"

    def measure(self, ctx: GateContext):
        new, old = ctx.new.error_rate, ctx.old.error_rate
        if new is None:
            return None, "no requests on the new version yet"
        old = old or 0.0
        return new - old, f"new {new:.4f} vs old {old:.4f}"
