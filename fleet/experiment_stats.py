"""The statistics of fleet experiments (manager side, scipy.stats): tests, intervals, sample sizes, decisions.

Every function takes plain counts (what agents report and the manager sums) and returns a typed result:

* rates (success / outcome rate per arm): two-proportion z test (pooled standard error for the test,
  unpooled for the confidence interval of the difference); assumes independent Bernoulli outcomes.
* mean rewards: Welch's t test from (n, sum, sum of squares); assumes independent outcomes and a mean
  that is approximately normal (CLT; n of a few dozen per arm).
* latency: Mann-Whitney U on the mergeable latency histograms (every observation placed at its bucket
  index: ties inside a bucket are handled by the tie-corrected normal approximation); effect size is the
  common-language effect P(challenger slower than champion) + 0.5 P(tie).
* agreement (shadow): Wilson interval of a proportion.
* sample size: fixed-horizon per-arm n for ``power`` at the level the decision reads
  (``decision_level``), computed when the experiment starts from the baseline rate and the minimum
  detectable effect; the decision is taken only once that n is reached (no peeking: a single look, so no
  alpha spending is needed; interim numbers are shown but never decide). The latency guardrail is a second
  test: Bonferroni splits alpha between them, so the primary test is read at alpha/2 and the horizon is
  sized at alpha/2 too (sized at alpha, the designed effect was promoted 71 % of the time, not 80 %).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

MAX_RANK_SAMPLES = 2_000_000        # histograms bigger than this are thinned (same shape) before ranking


@dataclass(frozen=True)
class TestResult:
    test: str                   # which test ran
    effect: float               # challenger - champion (rates, means) or the common-language effect (latency)
    ci_low: float
    ci_high: float
    p_value: float
    statistic: float
    n_champion: int
    n_challenger: int

    def to_dict(self) -> dict[str, object]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    decision: str               # promote | reject | continue
    reason: str
    samples_needed: int         # per arm, still to collect (0 at the horizon)
    horizon_per_arm: int


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def _two_sided_p(z: float) -> float:
    from scipy.stats import norm

    return float(2.0 * norm.sf(abs(z)))


def two_proportions(s_a: int, n_a: int, s_b: int, n_b: int, *, alpha: float = 0.05) -> TestResult:
    """Champion a, challenger b: difference of success rates b - a, its CI and the pooled z test."""
    if n_a <= 0 or n_b <= 0:
        return TestResult("two-proportion z", 0.0, -1.0, 1.0, 1.0, 0.0, n_a, n_b)
    p_a, p_b = s_a / n_a, s_b / n_b
    pooled = (s_a + s_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (p_b - p_a) / se_pooled if se_pooled > 0 else 0.0
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = _z(1 - alpha / 2) * se
    diff = p_b - p_a
    return TestResult("two-proportion z", diff, diff - half, diff + half, _two_sided_p(z) if se_pooled > 0 else 1.0,
                      z, n_a, n_b)


def welch_means(n_a: int, sum_a: float, sq_a: float, n_b: int, sum_b: float, sq_b: float, *,
                alpha: float = 0.05) -> TestResult:
    """Difference of mean rewards b - a from sufficient statistics, Welch's t test and its CI."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_ind_from_stats

    if n_a < 2 or n_b < 2:
        return TestResult("welch t", 0.0, -math.inf, math.inf, 1.0, 0.0, n_a, n_b)
    m_a, m_b = sum_a / n_a, sum_b / n_b
    v_a = max((sq_a - n_a * m_a * m_a) / (n_a - 1), 0.0)
    v_b = max((sq_b - n_b * m_b * m_b) / (n_b - 1), 0.0)
    diff = m_b - m_a
    se2 = v_a / n_a + v_b / n_b
    if se2 <= 0:
        return TestResult("welch t", diff, diff, diff, 1.0 if diff == 0 else 0.0, 0.0, n_a, n_b)
    res = ttest_ind_from_stats(m_b, math.sqrt(v_b), n_b, m_a, math.sqrt(v_a), n_a, equal_var=False)
    dof = se2 ** 2 / ((v_a / n_a) ** 2 / (n_a - 1) + (v_b / n_b) ** 2 / (n_b - 1))
    half = float(student_t.ppf(1 - alpha / 2, dof)) * math.sqrt(se2)
    return TestResult("welch t", diff, diff - half, diff + half, float(res.pvalue), float(res.statistic), n_a, n_b)


def _bucket_counts(cumulative: Mapping[str, int], keys: Sequence[str]) -> list[int]:
    out, prev = [], 0
    for k in keys:
        c = int(cumulative.get(k, prev))
        out.append(max(c - prev, 0))
        prev = max(c, prev)
    return out


def latency_mann_whitney(hist_a: Mapping[str, int], hist_b: Mapping[str, int], *,
                         alpha: float = 0.05) -> TestResult:
    """Is the challenger (b) slower? Mann-Whitney U on the bucket index of every observation."""
    import numpy as np
    from scipy.stats import mannwhitneyu

    from edgeml.fleet.protocol import BUCKET_KEYS

    a = np.array(_bucket_counts(hist_a, BUCKET_KEYS), dtype=np.int64)
    b = np.array(_bucket_counts(hist_b, BUCKET_KEYS), dtype=np.int64)
    n_a, n_b = int(a.sum()), int(b.sum())
    if n_a == 0 or n_b == 0:
        return TestResult("mann-whitney u (binned)", 0.5, 0.0, 1.0, 1.0, 0.0, n_a, n_b)
    a_t, b_t = _thin(a), _thin(b)
    idx = np.arange(len(a))
    xa, xb = np.repeat(idx, a_t), np.repeat(idx, b_t)
    if xa.min() == xa.max() == xb.min() == xb.max():     # every observation in one bucket: no evidence
        return TestResult("mann-whitney u (binned)", 0.5, 0.5, 0.5, 1.0, 0.0, n_a, n_b)
    res = mannwhitneyu(xb, xa, alternative="two-sided", method="asymptotic")
    cles = float(res.statistic) / (len(xa) * len(xb))    # P(b > a) + 0.5 P(tie)
    # CI of the common-language effect: normal approximation with Hanley-McNeil's variance
    q1, q2 = cles / (2 - cles), 2 * cles * cles / (1 + cles)
    var = (cles * (1 - cles) + (len(xb) - 1) * (q1 - cles ** 2) + (len(xa) - 1) * (q2 - cles ** 2)) / (len(xa) * len(xb))
    half = _z(1 - alpha / 2) * math.sqrt(max(var, 0.0))
    return TestResult("mann-whitney u (binned)", cles, max(cles - half, 0.0), min(cles + half, 1.0),
                      float(res.pvalue), float(res.statistic), n_a, n_b)


def _thin(counts):
    """Scale a histogram down to at most MAX_RANK_SAMPLES observations, keeping its shape (ranks need memory)."""
    import numpy as np

    total = int(counts.sum())
    if total <= MAX_RANK_SAMPLES:
        return counts
    return np.floor(counts * (MAX_RANK_SAMPLES / total)).astype(np.int64)


def wilson(successes: int, n: int, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score interval (good near 0 and 1, unlike the Wald interval)."""
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 0.0, 1.0
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return successes / n, float(ci.low), float(ci.high)


def mean_ci(n: int, total: float, squares: float, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval of a mean from its sufficient statistics."""
    from scipy.stats import t as student_t

    if n <= 0:
        return 0.0, -math.inf, math.inf
    m = total / n
    if n < 2:
        return m, -math.inf, math.inf
    var = max((squares - n * m * m) / (n - 1), 0.0)
    half = float(student_t.ppf(1 - alpha / 2, n - 1)) * math.sqrt(var / n)
    return m, m - half, m + half


def sample_size_proportions(baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n to detect an absolute change ``mde`` of a rate ``baseline`` (two-sided, normal approx.)."""
    p1, p2 = baseline, min(max(baseline + mde, 1e-9), 1 - 1e-9)
    if not 0 < p1 < 1 or mde == 0:
        raise ValueError("baseline must be in (0, 1) and the minimum detectable effect non-zero")
    pbar = (p1 + p2) / 2
    za, zb = _z(1 - alpha / 2), _z(power)
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (p2 - p1) ** 2
    return int(math.ceil(n))


def sample_size_means(sigma: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n to detect a change ``mde`` of a mean with standard deviation ``sigma`` (two-sided)."""
    if sigma <= 0 or mde == 0:
        raise ValueError("sigma must be > 0 and the minimum detectable effect non-zero")
    za, zb = _z(1 - alpha / 2), _z(power)
    return int(math.ceil(2 * ((za + zb) * sigma / mde) ** 2))


TESTS_READ = 2        # an A/B decision reads the primary metric and the latency guardrail


def decision_level(alpha: float, tests: int = TESTS_READ) -> float:
    """The two-sided level each test of a decision is read at (Bonferroni over the ``tests`` read): what
    ``decide`` compares p-values with, and so what the horizon must be sized for."""
    return alpha / tests


def decide(primary: TestResult, latency: TestResult | None, horizon: int, *, alpha: float = 0.05) -> Decision:
    """Fixed horizon, one look: before every arm has ``horizon`` outcomes the answer is ``continue``.

    At the horizon: promote when the challenger is significantly better on the primary metric (level
    alpha/2 when a latency guardrail is tested too: Bonferroni) and not significantly slower; reject otherwise."""
    have = min(primary.n_champion, primary.n_challenger)
    if have < horizon:
        return Decision("continue", f"{have} of {horizon} outcomes per arm collected (fixed horizon; interim"
                        " p-values do not decide)", horizon - have, horizon)
    level = decision_level(alpha) if latency is not None else alpha
    if latency is not None and latency.p_value < level and latency.effect > 0.5:
        return Decision("reject", f"challenger is slower (Mann-Whitney p={latency.p_value:.3g},"
                        f" P(slower)={latency.effect:.2f})", 0, horizon)
    if primary.p_value < level and primary.effect > 0:
        return Decision("promote", f"challenger better by {primary.effect:+.4g} ({primary.test} p="
                        f"{primary.p_value:.3g} < {level:g})", 0, horizon)
    if primary.p_value < level:
        return Decision("reject", f"challenger worse by {primary.effect:+.4g} ({primary.test} p="
                        f"{primary.p_value:.3g})", 0, horizon)
    return Decision("reject", f"no significant difference at the horizon ({primary.test} p={primary.p_value:.3g}"
                    f" >= {level:g}); keep the champion", 0, horizon)


def prob_best(arms: Sequence[tuple[float, float]], *, draws: int = 4000, seed: int = 0) -> list[float]:
    """Posterior probability that each arm is best, from Beta(alpha, beta) parameters (Monte Carlo)."""
    import numpy as np

    if not arms:
        return []
    rng = np.random.default_rng(seed)
    samples = np.stack([rng.beta(a, b, draws) for a, b in arms])
    wins = np.bincount(samples.argmax(axis=0), minlength=len(arms))
    return [float(w) / draws for w in wins]
