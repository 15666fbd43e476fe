"""error_rate: failed requests / requests of the new version, summed over its devices."""

from edgeml.fleet.gates import Gate, GateContext


class ErrorRateGate(Gate):
    name = "error_rate"

    def measure(self, ctx: GateContext):
        rate = ctx.new.error_rate
        return rate, f"new version {ctx.new.failures}/{ctx.new.requests} requests failed"
