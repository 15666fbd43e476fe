"""Compile cache hits and byte-identical rebuilds."""

from __future__ import annotations

import json
import zipfile

from click.testing import CliRunner

from edgeml.cli import main
from edgeml.compiler import compile_with_report


def test_repeated_compile_hits_the_cache_and_copies_the_artifact(mlp_file, mlp_data, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(target="x86_64", backend="onnxruntime", calib=mlp_data["calib"], eval=mlp_data["eval"],
              cache_dir=cache, benchmark_seconds=0.2, max_accuracy_drop=100)
    first = compile_with_report(mlp_file, output=tmp_path / "a.edgepkg", **kw)
    second = compile_with_report(mlp_file, output=tmp_path / "b.edgepkg", **kw)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.cache_key == first.cache_key
    assert (tmp_path / "a.edgepkg").read_bytes() == (tmp_path / "b.edgepkg").read_bytes()
    assert second.seconds < first.seconds
    assert list(cache.rglob("*.edgepkg"))
    # Anything that changes the artifact changes the key.
    third = compile_with_report(mlp_file, output=tmp_path / "c.edgepkg", version="0.2.0", **kw)
    assert third.cache == "miss" and third.cache_key != first.cache_key


def test_cli_says_cache_hit_and_no_cache_writes_nothing(mlp_file, tmp_path):
    runner = CliRunner()
    args = ["compile", str(mlp_file), "-t", "x86_64", "--backend", "onnxruntime", "--precision", "fp32",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    r1 = runner.invoke(main, args + ["-o", str(tmp_path / "1.edgepkg")])
    r2 = runner.invoke(main, args + ["-o", str(tmp_path / "2.edgepkg")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert json.loads(r1.stdout)["cache"] == "miss" and json.loads(r2.stdout)["cache"] == "hit"
    r3 = runner.invoke(main, ["compile", str(mlp_file), "-t", "x86_64", "--backend", "onnxruntime", "--no-cache",
                              "--cache-dir", str(tmp_path / "nocache"), "-o", str(tmp_path / "3.edgepkg")])
    assert r3.exit_code == 0, r3.output
    assert "cache: disabled" in r3.stdout and not (tmp_path / "nocache").exists()


def test_same_inputs_give_a_byte_identical_artifact(mlp_file, mlp_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = []
    for i in range(2):
        r = compile_with_report(mlp_file, target="x86_64", output=tmp_path / f"{i}.edgepkg", backend="onnxruntime",
                                precision="int8", calib=mlp_data["calib"], eval=mlp_data["eval"],
                                max_accuracy_drop=100, use_cache=False, ort_int8_recipes=["u8u8"])
        outs.append(r)
    a, b = (tmp_path / "0.edgepkg").read_bytes(), (tmp_path / "1.edgepkg").read_bytes()
    assert a == b
    m = outs[0].manifest
    assert m["provenance"]["created"] == "2023-11-14T22:13:20Z" and m["provenance"]["reproducible"] is True
    assert all(c.get("latency_ms") is None for c in m["candidates"])
    with zipfile.ZipFile(tmp_path / "0.edgepkg") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
