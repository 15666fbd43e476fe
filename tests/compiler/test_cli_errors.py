"""Each bad compile input gives its error class, exit code and a clear message; no output file is left."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgeml.cli import main

from compile_helpers import make_model


def run_compile(tmp_path, model, *extra, target="x86_64"):
    out = tmp_path / "out.edgepkg"
    result = CliRunner().invoke(main, ["compile", str(model), "-t", target, "-o", str(out),
                                       "--cache-dir", str(tmp_path / "cache"), *extra])
    assert not out.exists(), "a failed compile must not leave an output file"
    assert not list(tmp_path.glob(".out.edgepkg.*")), "no temp file may be left behind"
    return result


def test_unreadable_model_file(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    r = run_compile(tmp_path, bad)
    assert r.exit_code == 5
    assert "garbage.onnx is not a readable ONNX model" in r.stderr


def test_missing_model_file(tmp_path):
    r = run_compile(tmp_path, tmp_path / "nope.onnx")
    assert r.exit_code == 5 and "nope.onnx does not exist" in r.stderr


def test_unsupported_op_names_op_and_backend(tmp_path):
    # Acosh has no double kernel in ONNX Runtime: "Could not find an implementation for Acosh(9)".
    model = make_model([helper.make_node("Acosh", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 4])])
    path = tmp_path / "acosh.onnx"
    path.write_bytes(model.SerializeToString())
    r = run_compile(tmp_path, path, "--backend", "onnxruntime")
    assert r.exit_code == 5, r.output
    assert "operator Acosh" in r.stderr and "onnxruntime" in r.stderr


def test_custom_domain_op_is_unsupported(tmp_path):
    model = make_model([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "fancy.onnx"
    path.write_bytes(model.SerializeToString())
    r = run_compile(tmp_path, path, "--json")
    assert r.exit_code == 5
    err = json.loads(r.stdout)
    assert err["error"] == "UnsupportedOp" and "FancyOp" in err["message"] and "com.example" in err["message"]


def test_data_shape_mismatch(tmp_path, mlp_file):
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 5), np.float32))
    r = run_compile(tmp_path, mlp_file, "--eval", str(tmp_path / "eval.npz"))
    assert r.exit_code == 5
    assert "array 'x' has shape [4, 5]; the model's input 'x' expects [N, 6]" in r.stderr


def test_missing_input_shape(tmp_path):
    model = make_model([helper.make_node("Relu", ["img"], ["y"])],
                       [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    path = tmp_path / "dyn.onnx"
    path.write_bytes(model.SerializeToString())
    r = run_compile(tmp_path, path)
    assert r.exit_code == 5
    assert "dynamic non-batch dims" in r.stderr and "--input-shape img=1,3,N?,N?" in r.stderr


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 not really a zip", "is not a readable .npz"),
    (None, "has no array for model input 'x'"),
])
def test_bad_npz(tmp_path, mlp_file, content, message):
    path = tmp_path / "calib.npz"
    if content is None:
        np.savez(path, wrong=np.zeros((4, 6), np.float32))
    else:
        path.write_bytes(content)
    r = run_compile(tmp_path, mlp_file, "--calib", str(path))
    assert r.exit_code == 5 and message in r.stderr, r.output


def test_labels_must_match_the_samples(tmp_path, mlp_file):
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 6), np.float32), labels=np.zeros(3, np.int64))
    r = run_compile(tmp_path, mlp_file, "--eval", str(tmp_path / "eval.npz"))
    assert r.exit_code == 5 and "'labels' must be 4 integer class indices" in r.stderr


def test_unknown_target(tmp_path, mlp_file):
    r = run_compile(tmp_path, mlp_file, target="no-such-target")
    assert r.exit_code == 2 and "unknown target 'no-such-target'" in r.stderr and "x86_64-avx2" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--version", "1.0"], "is not a semantic version"),
    (["--input-shape", "x:1,6"], "is not NAME=D0,D1"),
    (["--precision", "fp16"], "does not support precision fp16"),
    (["--precision", "int8"], "needs calibration data"),
    (["--max-accuracy-drop", "-1"], "between 0 and 100"),
])
def test_bad_options_are_usage_errors(tmp_path, mlp_file, args, message):
    r = run_compile(tmp_path, mlp_file, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output


def test_output_that_is_a_folder(tmp_path, mlp_file):
    r = CliRunner().invoke(main, ["compile", str(mlp_file), "-t", "x86_64", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.stderr


def test_bad_signing_key_fails_before_compiling(tmp_path, mlp_file):
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    r = run_compile(tmp_path, mlp_file, "--sign-key", str(key))
    assert r.exit_code == 7 and "cannot read private key" in r.stderr


def test_unknown_int8_recipe_is_a_usage_error(tmp_path, mlp_file):
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 6), np.float32))
    r = run_compile(tmp_path, mlp_file, "--backend", "onnxruntime", "--calib", str(tmp_path / "c.npz"),
                    "--option", 'ort_int8_recipes=["s4s4"]')
    assert r.exit_code == 2 and "unknown ONNX Runtime int8 recipe 's4s4'" in r.stderr
