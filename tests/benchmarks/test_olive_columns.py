"""compile_speed's Olive columns: skipped with a printed reason without an Olive venv; one metric for both sides."""

from __future__ import annotations

import sys

import numpy as np

from edgeml.benchmarks import olive_columns


def test_no_olive_python_gives_the_reason():
    python, why = olive_columns.check_python(None)
    assert python is None and "--olive-python" in why


def test_a_python_without_olive_is_refused_with_the_reason(tmp_path):
    missing, why = olive_columns.check_python(tmp_path / "nope")
    assert missing is None and "not an executable file" in why
    # this test's own interpreter has no olive-ai: a real subprocess import fails
    python, why = olive_columns.check_python(sys.executable)
    if python is None:
        assert "cannot import olive" in why


def test_scores_use_labels_then_agreement_then_cosine():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    out = np.array([[0.9, 0.1], [0.7, 0.3]], np.float32)
    assert olive_columns.score(out, ref, np.array([0, 0]), encoder=False) == ("top1", 100.0)
    assert olive_columns.score(out, ref, None, encoder=False) == ("fp32_agreement", 50.0)
    metric, value = olive_columns.score(ref * 3.0, ref, None, encoder=True)
    assert metric == "cosine x100" and abs(value - 100.0) < 1e-4


def test_edgeml_speedup_is_over_the_fastest_passing_variant():
    info = {"variants": {"olive_fp32": {"accuracy": 99.0}, "olive_int8_static": {"accuracy": 98.5}}}
    olive_columns.finish(info, {"edgeml": 1.0, "olive:olive_fp32": 3.0, "olive:olive_int8_static": 2.0})
    assert info["best"] == "olive_int8_static" and info["speedup_edgeml_vs_olive"] == 2.0
    assert info["best_accuracy"] == 98.5
