"""``edgeml run`` batch jobs (folders, globs, stdin, images; resumable, atomic) and MQTT stream jobs
against a real Mosquitto started here on a free loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeml.cli import main


def _onnx_double() -> bytes:
    """x[N,4] float32 -> y = 2x."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _onnx_image_mean() -> bytes:
    """img[1,3,8,8] float32 -> mean[1,3,1,1] (GlobalAveragePool)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["img"], ["mean"])], "mean",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _artifact(path: Path, onnx_bytes: bytes, inputs: list[dict], outputs: list[dict]) -> Path:
    import onnxruntime

    from edgeml.runtime.artifact import write_artifact

    manifest = {
        "schema_version": 1, "name": path.stem, "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [], "precision": "fp32", "runtime": {"threads": 1},
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {}},
        "inputs": inputs, "outputs": outputs,
    }
    return write_artifact(path, manifest, {"model/model.onnx": onnx_bytes})


@pytest.fixture
def double(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return _artifact(tmp_path / "double.edgepkg", _onnx_double(), [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
                     [{"name": "y", "dtype": "float32", "shape": [None, 4]}])


def _items(folder: Path, n: int) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [np.full((2, 4), i, np.float32) for i in range(n)]
    for i, a in enumerate(arrays):
        if i % 2:
            np.savez(folder / f"item{i}.npz", x=a)
        else:
            np.save(folder / f"item{i}.npy", a)
    return arrays


def test_folder_job_writes_one_npz_per_item_and_resumes(double, tmp_path):
    arrays = _items(tmp_path / "in", 5)
    (tmp_path / "in" / "sub").mkdir()
    np.save(tmp_path / "in" / "sub" / "deep.npy", np.ones((1, 4), np.float32))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "in"), "--output", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert (summary["total"], summary["done"], summary["skipped"], summary["failed"]) == (6, 6, 0, 0)
    for i, a in enumerate(arrays):
        with np.load(out / f"item{i}.npz") as z:
            np.testing.assert_array_equal(z["y"], 2 * a)
    assert (out / "sub" / "deep.npz").is_file()
    assert "[6/6]" in res.stderr                                  # progress
    (out / "item3.npz").unlink()                                  # as if interrupted before item3
    before = (out / "item1.npz").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "in"), "--output", str(out), "--json"])
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert (summary["done"], summary["skipped"]) == (1, 5) and (out / "item3.npz").is_file()
    assert (out / "item1.npz").stat().st_mtime_ns == before       # done items are not rewritten
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_glob_and_stdin_inputs(double, tmp_path):
    _items(tmp_path / "in", 4)
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "in" / "*.npy"),
                                    "--output", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["item0.npz", "item2.npz"]
    paths = f"{tmp_path / 'in' / 'item1.npz'}\n\n{tmp_path / 'in' / 'item3.npz'}\n"
    res = CliRunner().invoke(main, ["run", str(double), "--input", "-", "--output", str(tmp_path / "s")], input=paths)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["item1.npz", "item3.npz"]


def test_bad_items_are_reported_and_the_job_goes_on(double, tmp_path):
    _items(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "in" / "wrong_shape.npy", np.zeros((1, 5), np.float32))
    np.save(tmp_path / "in" / "strings.npy", np.array([["a", "b", "c", "d"]]))
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "in"), "--output",
                                    str(tmp_path / "out"), "--json"])
    assert res.exit_code == 1
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert (summary["done"], summary["failed"]) == (2, 3)
    errors = {Path(f["item"]).name: f["error"] for f in summary["failures"]}
    assert "not a readable .npy" in errors["broken.npy"]
    assert "shape [1, 5]" in errors["wrong_shape.npy"] and "cannot be read as float32" in errors["strings.npy"]
    assert "Traceback" not in res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["item0.npz", "item1.npz"]   # nothing partial


def test_npz_bomb_is_refused_unread(double, tmp_path):
    import zipfile

    (tmp_path / "in").mkdir()
    with zipfile.ZipFile(tmp_path / "in" / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\0" * (300 << 20))               # 300 MiB of zeros, a few hundred KiB on disk
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "in"), "--output",
                                    str(tmp_path / "out"), "--json"])
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["failed"] == 1 and "over the limit" in summary["failures"][0]["error"]


@pytest.mark.parametrize("args, needle", [
    (["--input", "{tmp}/nothing-*.npy", "--output", "{tmp}/o"], "matches no"),
    (["--input", "{tmp}/in", "--output", "{tmp}/in/out"], "inside the input folder"),
    (["--input", "{tmp}/in"], "needs --output DIR"),
    (["--input", "{tmp}/in", "--output", "{tmp}/missing/out"], "parent folder"),
    (["--input", "{tmp}/in", "--mqtt-in", "a"], "stream job needs"),
    ([], "give --input"),
])
def test_bad_job_options_are_one_clear_error(double, tmp_path, args, needle):
    _items(tmp_path / "in", 1)
    res = CliRunner().invoke(main, ["run", str(double), *[a.format(tmp=tmp_path) for a in args]])
    assert res.exit_code != 0 and needle in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "in" / "out").exists()


def test_images_feed_an_image_model(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: image items are not read")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    art = _artifact(tmp_path / "mean.edgepkg", _onnx_image_mean(), [{"name": "img", "dtype": "float32",
                                                                     "shape": [1, 3, 8, 8]}],
                    [{"name": "mean", "dtype": "float32", "shape": [1, 3, 1, 1]}])
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 16), (255, 0, 51)).save(tmp_path / "in" / "red.png")
    res = CliRunner().invoke(main, ["run", str(art), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "o" / "red.npz") as z:
        np.testing.assert_allclose(z["mean"].ravel(), [1.0, 0.0, 0.2], atol=1e-6)


def test_one_npz_form_is_unchanged(double, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.ones((1, 4), np.float32))
    res = CliRunner().invoke(main, ["run", str(double), "--input", str(tmp_path / "x.npz"), "--output",
                                    str(tmp_path / "y.npz")])
    assert res.exit_code == 0 and "wrote" in res.output
    with np.load(tmp_path / "y.npz") as z:
        np.testing.assert_array_equal(z["y"], [[2, 2, 2, 2]])


# -- MQTT stream ------------------------------------------------------------------------------------
@pytest.fixture
def mosquitto(tmp_path):
    from edgeml.fleet.broker import Broker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); the stream job needs a real broker")
    b = Broker(tmp_path / "mosquitto", kind="mosquitto").start()
    yield b
    b.stop()


def test_mqtt_stream_answers_validates_and_counts(double, tmp_path, mosquitto):
    import paho.mqtt.client as mqtt

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "run", str(double), "--mqtt-in", "sensors/in",
                             "--mqtt-out", "sensors/out", "--broker", mosquitto.url, "--max-messages", "3", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    got: list[dict] = []
    ready = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("sensors/out", 1)
    sub.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
    sub.on_message = lambda c, u, msg: got.append(json.loads(msg.payload))
    host, port = mosquitto.url.split("//")[1].split(":")
    sub.connect(host, int(port))
    sub.loop_start()
    try:
        assert ready.wait(10)
        deadline = time.monotonic() + 60
        while "consuming" not in (line := proc.stderr.readline()) and time.monotonic() < deadline:
            assert line or proc.poll() is None, proc.stderr.read()
        good = {"id": "a", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        bad = {"id": "b", "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        for doc in (good, bad):
            sub.publish("sensors/in", json.dumps(doc), qos=1).wait_for_publish(5)
        sub.publish("sensors/in", b"{not json", qos=1).wait_for_publish(5)
        out, err = proc.communicate(timeout=60)
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert got[0]["id"] == "a" and got[0]["outputs"][0]["data"] == [2, 4, 6, 8]
    assert got[1]["id"] == "b" and got[1]["status"] == 400 and "input 'x' has shape [1, 3]" in got[1]["error"]
    assert got[2]["status"] == 400 and "not valid JSON" in got[2]["error"]
    stats = json.loads(out[out.index("{"):])
    assert (stats["messages"], stats["requests"], stats["rejected"], stats["failures"]) == (3, 3, 2, 0)


@pytest.mark.parametrize("args, needle", [(["--broker", "http://x"], "must be mqtt://"),
                                          (["--mqtt-out", "out/#"], "wildcards"),
                                          (["--broker", "mqtt://127.0.0.1:1"], "cannot connect")])
def test_bad_stream_options_are_one_clear_error(double, args, needle):
    base = {"--mqtt-in": "in", "--mqtt-out": "out", "--broker": "mqtt://127.0.0.1:1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    res = CliRunner().invoke(main, ["run", str(double), *[x for kv in base.items() for x in kv]])
    assert res.exit_code != 0 and needle in res.output, res.output
    assert "Traceback" not in res.output
