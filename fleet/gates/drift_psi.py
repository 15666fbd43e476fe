"""drift_psi: the new version's drift score (largest per-column PSI against the artifact's reference
profile, edgeml.fleet.drift) on the devices it reached, e.g. ``--gate 'drift_psi<0.2'``."""

from edgeml.fleet.gates import Gate, GateContext


class DriftPsiGate(Gate):
    name = "drift_psi"

    def measure(self, ctx: GateContext) -> tuple[float | None, str]:
        if ctx.drift is None:
            return None, "this manager does not compute drift"
        return ctx.drift()
