"""failure_rate: share of the current wave's devices that failed (or timed out) installing."""

from edgeml.fleet.gates import Gate, GateContext


class FailureRateGate(Gate):
    name = "failure_rate"

    def measure(self, ctx: GateContext):
        if ctx.wave_devices == 0:
            return None, "empty wave"
        return ctx.failed / ctx.wave_devices, f"{ctx.failed}/{ctx.wave_devices} devices failed in wave {ctx.wave + 1}"
