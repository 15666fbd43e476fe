"""``edgeml compile --keep-fallback`` (issue 15 row 2): a sibling fallback artifact that the server serves when
the primary cannot load. Real compile (ONNX Runtime + OpenVINO when installed), real signing, real server."""

from __future__ import annotations

import http.client
import json
import shutil
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from compile_helpers import ort_run


def _compile(args):
    from edgeml.cli import main

    res = CliRunner().invoke(main, ["compile", *args, "--json", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)   # progress bars of the libraries go to stderr


def _manifest(path):
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


def _corrupt_model_member(src, dst):
    """A copy of ``src`` whose model file is damaged (a bad flash write): the artifact no longer verifies."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.startswith("model/") and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            zout.writestr(info, data)


def test_keep_fallback_writes_a_signed_sibling_the_server_falls_back_to(mlp_file, mlp_data, tmp_path):
    from edgeml.runtime.dtypes import datatype_of
    from edgeml.runtime.server import ModelServer, ServerConfig
    from edgeml.runtime.signing import generate_keypair

    key, pub = generate_keypair(tmp_path / "keys" / "signing.key")
    out = tmp_path / "out" / "mlp.edgepkg"
    out.parent.mkdir()
    report = _compile([str(mlp_file), "-t", "x86_64", "-o", str(out), "--calib", str(mlp_data["calib"]),
                       "--eval", str(mlp_data["eval"]), "--no-benchmark", "--no-cache", "--sign-key", str(key),
                       "--max-accuracy-drop", "100", "--version", "1.0.0", "--keep-fallback"])
    fb = out.with_name("mlp.fallback.edgepkg")
    assert out.is_file() and fb.is_file(), sorted(p.name for p in out.parent.iterdir())
    primary_m, fallback_m = _manifest(out), _manifest(fb)
    assert primary_m["runtime"]["fallback"] == "mlp.fallback.edgepkg" and "fallback" not in fallback_m["runtime"]
    assert report["fallback"] == "mlp.fallback.edgepkg"
    assert (fallback_m["name"], fallback_m["version"]) == (primary_m["name"], primary_m["version"])
    p_cand = (primary_m["backend"]["name"], primary_m["precision"])
    f_cand = (fallback_m["backend"]["name"], fallback_m["precision"])
    assert p_cand != f_cand
    assert f_cand[0] != p_cand[0] or f_cand[1] == "fp32", "another backend, else the FP32 build"
    assert fallback_m["selection"]["reason"].startswith("fallback of ")
    assert [c["label"] for c in fallback_m["candidates"] if c["status"] == "selected"] != \
           [c["label"] for c in primary_m["candidates"] if c["status"] == "selected"]

    import edgeml

    for path in (out, fb):      # both signed with the same key, both pass their self-test
        model = edgeml.load(path, trusted_keys=[pub], require_signature=True, cache_dir=tmp_path / "c")
        assert model.selftest().passed
        model.close()

    broken_dir = tmp_path / "device"
    broken_dir.mkdir()
    _corrupt_model_member(out, broken_dir / out.name)
    shutil.copy(fb, broken_dir / fb.name)
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "sc"))
    srv.load(broken_dir / out.name, name="mlp", version="1")
    x = mlp_data["x"][:3]
    with srv:
        info = srv.models()[0]
        assert info["fallback"]["active"] is True and info["fallback"]["primary_load_error"]
        assert info["backend"] == f_cand[0] and info["precision"] == f_cand[1]
        host, port = srv.address
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype_of(x.dtype),
                            "data": x.ravel().tolist()}]}
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/v2/models/mlp/infer", json.dumps(body).encode())
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
    assert resp.status == 200, doc
    want = ort_run(mlp_file, {"x": x})
    out0 = doc["outputs"][0]
    got = np.array(out0["data"], np.float32).reshape(out0["shape"])
    tol = 1e-3 if f_cand[1] == "fp32" else 0.2
    np.testing.assert_allclose(got, want[out0["name"]], rtol=tol, atol=tol)


def test_without_the_flag_no_fallback_is_written(mlp_file, mlp_data, tmp_path):
    out = tmp_path / "mlp.edgepkg"
    report = _compile([str(mlp_file), "-t", "x86_64", "-o", str(out), "--eval", str(mlp_data["eval"]),
                       "--no-benchmark", "--no-cache", "--precision", "fp32", "--backend", "onnxruntime"])
    assert report["fallback"] is None
    assert out.is_file() and not out.with_name("mlp.fallback.edgepkg").exists()
    assert "fallback" not in _manifest(out)["runtime"]


def test_keep_fallback_with_a_single_candidate_says_so_and_writes_none(mlp_file, mlp_data, tmp_path):
    from edgeml.compiler import compile_with_report

    notes = []
    out = tmp_path / "mlp.edgepkg"
    compile_with_report(str(mlp_file), target="x86_64", output=out, eval=mlp_data["eval"], benchmark=False,
                        use_cache=False, precision="fp32", backend="onnxruntime", keep_fallback=True,
                        progress=notes.append)
    assert not out.with_name("mlp.fallback.edgepkg").exists() and "fallback" not in _manifest(out)["runtime"]
    assert any("no fallback is written" in n for n in notes), notes


@pytest.mark.parametrize("value", ["yes", 2])
def test_keep_fallback_option_is_typed(value, tmp_path, mlp_file):
    from edgeml.compiler import compile_with_report
    from edgeml.errors import UsageError

    with pytest.raises(UsageError, match="keep_fallback"):
        compile_with_report(str(mlp_file), target="x86_64", output=tmp_path / "m.edgepkg", keep_fallback=value)
