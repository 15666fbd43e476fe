"""p95_latency_ms: p95 latency of the new version, from histograms merged over its devices."""

from edgeml.fleet.gates import Gate, GateContext


class P95LatencyGate(Gate):
    name = "p95_latency_ms"

    def measure(self, ctx: GateContext):
        p95 = ctx.new.p95()
        if p95 is None:
            return None, f"{ctx.new.requests} requests on {ctx.new.devices} devices so far"
        return p95, f"new version p95 <= {p95} ms over {ctx.new.requests} requests on {ctx.new.devices} devices"
