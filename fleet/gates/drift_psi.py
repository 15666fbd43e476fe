"""drift_psi: the new version's ``drifted`` verdict on the devices it reached, e.g. ``--gate 'drift_psi<0.2'``.

The gate decides exactly as ``edgeml fleet drift --min-psi X --alpha GATE_ALPHA`` would
(``edgeml.fleet.drift.verdict``): it breaches only when, over the windows received since the rollout
started, there are at least ``min_samples`` (50) live samples AND the Holm-adjusted chi-square p-value
is below ``GATE_ALPHA`` AND the largest column PSI is at least X (the number written in the expression:
the effect size that matters). Below the sample floor it reports "not enough data yet", which is no
breach and no pass: the wave keeps baking (the bake time bounds the wait) and the gate looks again.

The raw PSI alone is not a decision: it is biased upwards at small n (a clean window of 50 samples
has a max column PSI >= 0.2 almost always), so ``drift_psi<0.2`` used to roll back healthy releases.
docs/monitoring.md has the false-breach and miss rates (benchmarks/drift_gate.py).
"""

from __future__ import annotations

from edgeml.fleet.gates import Gate, GateContext, GateResult

# The gate looks again on every manager tick while the data accumulates (repeated looks at a growing
# sample), so it tests at a stricter level than one look of `fleet drift` (alpha 0.01); see docs/monitoring.md.
GATE_ALPHA = 1e-4


class DriftPsiGate(Gate):
    name = "drift_psi"

    def settings(self):
        from edgeml.fleet.drift import DEFAULT_MIN_SAMPLES, Settings

        return Settings(alpha=GATE_ALPHA, min_psi=self.threshold, min_samples=DEFAULT_MIN_SAMPLES)

    def measure(self, ctx: GateContext) -> tuple[float | None, str]:
        if ctx.drift is None:
            return None, "this manager does not compute drift"
        return ctx.drift()

    def evaluate(self, ctx: GateContext) -> GateResult:
        from edgeml.fleet.drift import verdict

        measure = self.measure(ctx)
        rep = getattr(measure, "report", None)
        settings = self.settings()
        if rep is None or rep.score is None or rep.p_value is None:
            n = rep.samples if rep is not None else 0
            if rep is not None and n < settings.min_samples and rep.reason and "samples" in rep.reason:
                detail = f"not enough data yet ({n} of {settings.min_samples} samples; the wave bakes on)"
            else:
                detail = f"no data yet ({measure[1]})"
            return GateResult(self.name, True, None, self.threshold, detail)
        drifted = verdict(rep.samples, rep.score, rep.p_value, settings, inclusive=self.inclusive)
        cmp = ">" if self.inclusive else ">="
        why = (f"drifted: Holm p {rep.p_value:.3g} < {settings.alpha:g} and max PSI {rep.score:.3f} {cmp}"
               f" {self.threshold:g}" if drifted else
               f"not drifted: a breach needs Holm p < {settings.alpha:g} and max PSI {cmp} {self.threshold:g}")
        return GateResult(self.name, not drifted, round(rep.score, 6), self.threshold, f"{why}; {measure[1]}")
