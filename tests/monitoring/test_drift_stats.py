"""Manager-side statistics: known answers, then the proof on real data (digits CNN, breast-cancer MLP)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from edgeml.benchmarks import drift_detect as B
from edgeml.fleet import drift as F


def test_psi_is_zero_for_identical_and_grows_with_shift():
    ref = np.array([100, 100, 100, 100])
    assert F.psi(ref, ref * 3) == pytest.approx(0.0, abs=1e-12)
    small, big = F.psi(ref, np.array([110, 100, 100, 90])), F.psi(ref, np.array([200, 100, 60, 40]))
    assert 0 < small < 0.01 < 0.2 < big


def test_chi_square_matches_scipy_when_no_bin_is_sparse():
    ref, live = np.array([50, 60, 40, 50]), np.array([30, 20, 25, 25])
    expected = chi2_contingency(np.vstack([ref, live]), correction=False).pvalue
    assert F.chi2_pvalue(ref, live, ordered=True) == pytest.approx(expected)


def test_sparse_bins_are_merged_until_expected_counts_reach_five():
    ref, live = np.array([1, 2, 100, 100, 1]), np.array([0, 1, 10, 10, 0])
    r, lv = F.merge_sparse_bins(ref, live, ordered=True)
    share = min(r.sum(), lv.sum()) / (r.sum() + lv.sum())
    assert r.sum() == ref.sum() and lv.sum() == live.sum()
    assert ((r + lv) * share).min() >= F.MIN_EXPECTED


def test_holm_known_answer():
    # p = (0.01, 0.04, 0.03, 0.005) -> sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> monotone 0.02, 0.03, 0.06, 0.06
    assert F.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


@pytest.fixture(scope="module")
def digits_case():
    return B.digits_case()


def test_digits_clean_windows_raise_few_false_alarms(digits_case):
    res = B.run_case(digits_case, windows=60, trials=0, sizes=())
    print("digits false alarms:", res["clean"])
    assert res["clean"]["alarms"] <= 3        # alpha 0.01 with Holm: expected <= 0.6 of 60


def test_digits_shifted_images_are_detected_with_100_samples(digits_case):
    res = B.run_case(digits_case, windows=0, trials=8, sizes=(100,))
    for row in res["shifted"]:
        print("digits", row["condition"], row["detection_rate"])
        assert row["detection_rate"][100] == 1.0, row


def test_breast_cancer_mlp_clean_and_shifted():
    pytest.importorskip("torch", reason="the breast-cancer MLP is trained with torch")
    case = B.mlp_case()
    res = B.run_case(case, windows=40, trials=8, sizes=(200,))
    print("mlp:", res["clean"], [(r["condition"], r["detection_rate"]) for r in res["shifted"]])
    assert res["clean"]["alarms"] <= 2
    rates = {r["condition"]: r["detection_rate"][200] for r in res["shifted"]}
    assert rates["every feature +0.5 sd"] == 1.0
    assert rates["gaussian noise sd 0.5"] >= 0.75
