"""One registry entry per backend feeds the compiler, the runtime, the CLI and option checking."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import edgeml
from edgeml.backends import BACKENDS, all_option_names, backend_names, get_backend, open_backend
from edgeml.backends.base import CompilerBackend, RuntimeBackend
from edgeml.backends.errors import ErrorTable
from edgeml.errors import BackendError, UnsupportedOp, UsageError


def test_every_entry_resolves_to_its_four_parts():
    assert backend_names() == ["onnxruntime", "openvino", "tvm", "null"]
    for name in backend_names():
        entry = get_backend(name)
        assert entry.name == name
        assert isinstance(entry.compiler(), CompilerBackend) and entry.compiler().name == name
        assert issubclass(entry.runtime_class(), RuntimeBackend) and entry.runtime_class().name == name
        assert isinstance(entry.error_table(), ErrorTable) and entry.error_table().backend == name
        assert entry.option_names(), f"{name} declares no typed options"
    assert [n for n in backend_names() if not get_backend(n).auto] == ["null"]


def test_cli_backend_choices_come_from_the_registry():
    from edgeml.cli import main

    out = CliRunner().invoke(main, ["compile", "--help"])
    assert out.exit_code == 0
    for name in BACKENDS.names():
        assert name in out.output


def test_misspelled_compile_option_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(UsageError, match="unknown compile option 'tune_budjet' \\(did you mean tune_budget\\?\\)") \
            as info:
        edgeml.compile(tmp_path / "missing.onnx", target="x86_64", output=tmp_path / "o.edgepkg", tune_budjet="10m")
    assert "max_accuracy_drop" in info.value.hint and "ov_subset_size" in info.value.hint
    assert not (tmp_path / "o.edgepkg").exists()


def test_backend_option_values_are_checked_against_the_schema(tmp_path):
    kw = {"target": "x86_64", "output": tmp_path / "o.edgepkg"}
    with pytest.raises(UsageError, match="openvino option ov_subset_size='many' is not int"):
        edgeml.compile(tmp_path / "m.onnx", ov_subset_size="many", **kw)
    with pytest.raises(UsageError, match="ort_calibration='median' is not one of"):
        edgeml.compile(tmp_path / "m.onnx", ort_calibration="median", **kw)
    with pytest.raises(UsageError, match="tune budget 'ten minutes' is not a duration"):
        edgeml.compile(tmp_path / "m.onnx", tune_budget="ten minutes", **kw)
    with pytest.raises(UsageError, match="unknown knob 'latency'"):
        edgeml.compile(tmp_path / "m.onnx", null_candidates={"a": {"latency": 3}}, **kw)


def test_command_line_strings_become_typed_options():
    entry = get_backend("openvino")
    opts = entry.parse_options({"ov_subset_size": "64", "ov_accuracy_control": "false", "tune_budget": "1h"})
    assert opts.ov_subset_size == 64 and opts.ov_accuracy_control is False
    assert get_backend("tvm").parse_options({"tune_budget": "1h30m"}).tune_budget == 5400.0
    assert get_backend("onnxruntime").parse_options({"ort_int8_recipes": "u8u8, s8s8-per-channel"}).ort_int8_recipes \
        == ("u8u8", "s8s8-per-channel")
    assert set(all_option_names()) >= {"tune_budget", "ov_subset_size", "ort_int8_recipes", "null_candidates"}


def test_cli_refuses_a_misspelled_option_with_exit_2(tmp_path):
    from edgeml.cli import main

    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-t", "x86_64", "-o", str(tmp_path / "o"),
                                  "--option", "ov_subset_sise=3", "--json"])
    assert r.exit_code == 2
    err = json.loads(r.stdout)
    assert err["error"] == "UsageError" and "did you mean ov_subset_size" in err["message"]


def unknown_op_model(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    (tmp_path / "model").mkdir(parents=True)
    (tmp_path / "model" / "model.onnx").write_bytes(model.SerializeToString())
    return {"backend": {"name": "onnxruntime", "entrypoint": "model/model.onnx", "options": {}},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}]}


def test_the_runtime_maps_ort_errors_through_the_backend_table(tmp_path):
    # Before: every ONNX Runtime load error became a bare BackendError; the table names the op.
    with pytest.raises(UnsupportedOp, match="operator FancyOp of domain com.example is unknown to ONNX Runtime"):
        open_backend("onnxruntime", tmp_path, unknown_op_model(tmp_path))
    manifest = unknown_op_model(tmp_path / "junk")
    (tmp_path / "junk" / "model" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BackendError, match="ONNX Runtime cannot load model.onnx") as info:
        open_backend("onnxruntime", tmp_path / "junk", manifest)
    assert type(info.value) is BackendError


def test_the_null_runtime_is_deterministic_and_rotates_the_requested_share(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "null.json").write_text(json.dumps({"error": 0.5}))
    manifest = {"backend": {"name": "null", "entrypoint": "model/null.json", "options": {}},
                "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}]}
    rt = open_backend("null", tmp_path, manifest)
    x = np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32)
    whole = rt.run({"x": x})["y"]
    halves = np.concatenate([rt.run({"x": x[:123]})["y"], rt.run({"x": x[123:]})["y"]])
    np.testing.assert_array_equal(whole, halves)
    changed = float(np.mean(np.any(whole != x, axis=1)))
    assert 0.4 < changed < 0.6


DEVICE_FORBIDDEN = ("torch", "openvino", "tvm", "nncf", "onnx", "neural_compressor", "edgeml.compiler",
                    "edgeml.backends.onnxruntime.build", "edgeml.backends.openvino", "edgeml.backends.tvm",
                    "edgeml.backends.null")
DEVICE_ALLOWED = {"edgeml.backends.base", "edgeml.backends.entry", "edgeml.backends.options", "edgeml.backends.errors",
                  "edgeml.backends.onnxruntime", "edgeml.backends.onnxruntime.run", "edgeml.backends.onnxruntime.errors"}


def test_loading_an_ort_artifact_imports_only_the_ort_run_side(identity_model, tmp_path):
    """A device imports the registry and the artifact's run module: no compiler, no other backend, no onnx."""
    art = edgeml.compile(identity_model, target="x86_64", output=tmp_path / "m.edgepkg", backend="onnxruntime",
                         cache_dir=False, benchmark=False, precision="fp32")
    code = (
        "import sys, json, numpy as np, edgeml\n"
        f"m = edgeml.load({str(art)!r}, cache_dir={str(tmp_path / 'c')!r})\n"
        "m.predict({'x': np.zeros((1, 4), np.float32)})\n"
        f"print(json.dumps(sorted(k for k in {DEVICE_FORBIDDEN!r} if k in sys.modules)))\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.startswith('edgeml.backends.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    forbidden, loaded = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert forbidden == []
    assert set(loaded) <= DEVICE_ALLOWED, set(loaded) - DEVICE_ALLOWED
    assert "edgeml.backends.onnxruntime.run" in loaded
