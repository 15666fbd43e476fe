"""Budgets as constraints: --max-memory-mb (a fresh worker's resident memory at batch 1) and --max-size-mb."""

from __future__ import annotations

import pytest

from edgeml.errors import CompileError

from null_compile import compile_null

# The null candidates are compiled for the x86_64 target: on another arch nothing may run (never executed here).
pytestmark = pytest.mark.needs_cpu("arch:x86_64")


def test_a_candidate_over_the_memory_budget_is_rejected_with_its_figure(identity_model, eval_data, tmp_path):
    # "big" keeps 64 MiB more on every run (the null TEST DOUBLE's allocate_mb): the profile's 4 runs at batch 1
    # hold >= 256 MiB on top of the interpreter, over a 200 MB budget; "small" stays near the interpreter's size.
    result = compile_null(identity_model, eval_data, tmp_path, {"big": {"allocate_mb": 64}, "small": {}},
                          max_memory_mb=200)
    cands = {c["label"]: c for c in result.candidates}
    big, small = cands["null/fp32/big"], cands["null/fp32/small"]
    assert big["status"] == "rejected" and "allowed: max_memory_mb" in big["reason"], big
    assert big["memory"]["run_peak_mb"] > 200
    assert small["status"] == "selected" and 0 < small["memory"]["baseline_mb"] <= small["memory"]["run_peak_mb"] < 200
    assert small["size_mb"] is not None and result.manifest["provenance"]["options"]["max_memory_mb"] == 200


def test_nothing_fits_a_size_budget_is_a_compile_error_naming_the_budget(identity_model, eval_data, tmp_path):
    with pytest.raises(CompileError, match="no candidate fits the budgets") as info:
        compile_null(identity_model, eval_data, tmp_path, {"a": {}}, max_size_mb=1e-9)
    assert "allowed: max_size_mb" in info.value.message and not (tmp_path / "out.edgepkg").exists()


@pytest.mark.parametrize("value", [0, -5, "lots"])
def test_budgets_are_checked_before_any_work(identity_model, eval_data, tmp_path, value):
    from edgeml.errors import UsageError

    with pytest.raises(UsageError, match="max_memory_mb"):
        compile_null(identity_model, eval_data, tmp_path, {"a": {}}, max_memory_mb=value)
