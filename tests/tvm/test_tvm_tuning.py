"""TVM tuning within a budget: records are made, applied, stored, and reused by the next compile."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeml.backends.tvm import tuning as tvm_tuning

BUDGET_S = 30


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_onnx):
    """One tuned build and one rebuild from the same database (the rebuild must not measure again)."""
    from edgeml.targets import best_host_target
    from tvm_artifacts import build_tvm_artifact

    root = tmp_path_factory.mktemp("tvm-tuned")
    messages: list[str] = []
    target = best_host_target().name
    options = {"tune_budget": f"{BUDGET_S}s", "tuning_db": str(root / "db")}
    start = time.perf_counter()
    first = build_tvm_artifact(tiny_onnx, target, root / "tuned.edgepkg", options=options, progress=messages.append)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = build_tvm_artifact(tiny_onnx, target, root / "again.edgepkg", options=options, progress=messages.append)
    again_s = time.perf_counter() - start
    print(f"tuned build {first_s:.0f}s (budget {BUDGET_S}s), rebuild from the database {again_s:.0f}s")
    return {"first": first, "again": again, "messages": messages, "root": root}


@pytest.mark.slow
def test_tuned_build_measures_kernels_and_matches_onnxruntime(tuned, sample_inputs, ort_reference):
    import edgeml
    from edgeml.runtime.artifact import read_manifest

    recipe = read_manifest(tuned["first"])["quantization"]
    assert recipe["tuned"] is True
    assert recipe["trials"] > 0, recipe
    # the trap from the issue: builds failing silently (builder timeouts) must not happen
    assert recipe["failed_builds"] == 0, recipe["first_error"]
    assert recipe["tasks_tuned"] == recipe["tasks"] > 0
    assert any("tvm tuning:" in m and "trials" in m for m in tuned["messages"]), "tuning shows progress"
    model = edgeml.load(tuned["first"], cache_dir=tuned["root"] / "c")
    assert model.manifest["backend"]["options"]["static_batch"] == 1
    # compiled for batch 1; a batch of 4 runs slice by slice
    got = model.predict(sample_inputs)["logits"]
    np.testing.assert_allclose(got, ort_reference, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_second_compile_reuses_the_database(tuned):
    from edgeml.runtime.artifact import read_manifest

    first = read_manifest(tuned["first"])["quantization"]
    again = read_manifest(tuned["again"])["quantization"]
    assert again["database"] == first["database"]
    assert again["tasks"] == first["tasks"]
    # every kernel measured by the first build comes from the database; only the rest is tuned
    assert again["tasks_from_database"] >= first["tasks_measured"] > 0
    assert again["tasks_tuned"] == again["tasks"] - again["tasks_from_database"]
    if first["tasks_measured"] == first["tasks"]:
        assert again["trials"] == 0


def test_database_folder_is_keyed_by_target(tmp_path):
    import tvm

    a = tvm_tuning.database_dir(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), tmp_path)
    b = tvm_tuning.database_dir(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}), tmp_path)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith("llvm-haswell-")
    assert tvm_tuning.database_dir(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), tmp_path) == a


def test_fast_stack_keeps_what_tvmscript_reads():
    import inspect

    def probe():
        return tvm_tuning._fast_stack(), inspect.stack()

    fast, slow = probe()
    assert len(fast) == len(slow)
    for f, s in zip(fast[:3], slow[:3]):
        assert (f.filename, f.lineno, f.function, f.code_context) == (s.filename, s.lineno, s.function, s.code_context)
    assert [f.frame for f in fast] == [s.frame for s in slow]
