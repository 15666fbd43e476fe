"""The .edgepkg format refuses every unsafe or damaged archive and writes nothing outside its folder."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeml
from edgeml.errors import ArtifactError, SignatureError, UnsupportedHost
from edgeml.runtime.artifact import open_artifact, read_manifest, verify_zip, write_artifact
from edgeml.runtime.signing import generate_keypair


def tiny_onnx() -> bytes:
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def manifest(**over) -> dict:
    m = {"schema_version": 1, "name": "tiny", "version": "1.0.0", "target": "x86_64", "arch": "x86_64",
         "required_features": [], "precision": "fp32",
         "backend": {"name": "onnxruntime", "version": "", "entrypoint": "model/model.onnx", "options": {}},
         "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
         "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}]}
    m.update(over)
    return m


@pytest.fixture
def good(tmp_path) -> Path:
    return write_artifact(tmp_path / "good.edgepkg", manifest(), {"model/model.onnx": tiny_onnx()})


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip member by member; ``change(name, data) -> (name, data) | None`` edits or drops members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            res = change(info.filename, zin.read(info.filename))
            if res is not None:
                zout.writestr(res[0], res[1])
    return dst


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def test_good_artifact_round_trips(good, tmp_path):
    model = edgeml.load(good, cache_dir=tmp_path / "c")
    y = model.predict({"x": np.ones((2, 4), np.float32)})["y"]
    np.testing.assert_allclose(y, np.ones((2, 4)) @ (np.arange(12).reshape(4, 3) / 10), rtol=1e-6)


def test_tampered_member_is_refused(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.edgepkg",
                  lambda n, d: (n, d.replace(b"MatMul", b"MatMuL") if n.endswith(".onnx") else d))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        edgeml.load(bad, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("model.onnx")), "nothing of a refused artifact may be extracted"


def test_truncated_archive_is_refused(good, tmp_path):
    bad = tmp_path / "cut.edgepkg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        edgeml.load(bad, cache_dir=tmp_path / "c")


def test_missing_member_is_refused(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.edgepkg", lambda n, d: None if n.endswith(".onnx") else (n, d))
    with pytest.raises(ArtifactError, match="missing"):
        verify_zip(bad)


def test_unlisted_extra_member_is_refused(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.edgepkg", lambda n, d: (n, d))
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("model/extra.bin", b"surprise")
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        verify_zip(bad)


@pytest.mark.parametrize("member", ["../escape.txt", "model/../../escape.txt", "/tmp/edgeml-abs-escape.txt",
                                    "model\\..\\escape.txt"])
def test_path_traversing_members_are_refused_and_nothing_is_written(good, tmp_path, member):
    dest = tmp_path / "dest" / "cache"
    bad = tmp_path / "evil.edgepkg"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        zout.writestr(zipfile.ZipInfo(member), b"owned")
    with pytest.raises(ArtifactError, match="escapes the artifact folder|absolute path|backslash"):
        open_artifact(bad, cache_dir=dest)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest" / "escape.txt").exists()
    assert not Path("/tmp/edgeml-abs-escape.txt").exists()
    assert files_under(dest) == set()


def test_traversing_name_in_the_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="escapes the artifact folder"):
        write_artifact(tmp_path / "x.edgepkg", manifest(), {"../model.onnx": tiny_onnx()})
    m = manifest(files={"../x": {"sha256": "0" * 64, "size": 1}})
    raw = json.dumps(m).encode()
    with zipfile.ZipFile(tmp_path / "y.edgepkg", "w") as zf:
        zf.writestr("manifest.json", raw)
    with pytest.raises(ArtifactError, match="escapes"):
        read_manifest(tmp_path / "y.edgepkg")


def test_symlink_member_is_refused(good, tmp_path):
    bad = tmp_path / "link.edgepkg"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        link = zipfile.ZipInfo("model/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zout.writestr(link, "/etc/passwd")
    with pytest.raises(ArtifactError, match="link or folder"):
        verify_zip(bad)


def test_unsigned_when_required_and_wrong_key_are_refused(tmp_path):
    key_a, pub_a = generate_keypair(tmp_path / "a")
    _, pub_b = generate_keypair(tmp_path / "b")
    unsigned = write_artifact(tmp_path / "u.edgepkg", manifest(), {"model/model.onnx": tiny_onnx()})
    signed = write_artifact(tmp_path / "s.edgepkg", manifest(), {"model/model.onnx": tiny_onnx()}, sign_key=key_a)
    with pytest.raises(SignatureError, match="unsigned"):
        edgeml.load(unsigned, trusted_keys=[pub_a], cache_dir=tmp_path / "c")
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        edgeml.load(signed, trusted_keys=[pub_b], cache_dir=tmp_path / "c")
    assert edgeml.load(signed, trusted_keys=[pub_a], cache_dir=tmp_path / "c").artifact.signed_by
    # Editing the signed manifest (e.g. bumping the version) breaks the signature.
    forged = rewrite(signed, tmp_path / "f.edgepkg",
                     lambda n, d: (n, d.replace(b'"1.0.0"', b'"9.9.9"') if n == "manifest.json" else d))
    with pytest.raises(SignatureError, match="does not match"):
        edgeml.load(forged, trusted_keys=[pub_a], cache_dir=tmp_path / "c")


def test_wrong_isa_is_refused(tmp_path):
    fake = write_artifact(tmp_path / "isa.edgepkg", manifest(required_features=["avx512_fake_feature"]),
                          {"model/model.onnx": tiny_onnx()})
    with pytest.raises(UnsupportedHost, match="avx512_fake_feature"):
        edgeml.load(fake, cache_dir=tmp_path / "c")
    other_arch = write_artifact(tmp_path / "arm.edgepkg", manifest(arch="aarch64" if os.uname().machine != "aarch64" else "x86_64"),
                                {"model/model.onnx": tiny_onnx()})
    with pytest.raises(UnsupportedHost, match="needs a"):
        edgeml.load(other_arch, cache_dir=tmp_path / "c")


def test_writer_is_deterministic(tmp_path):
    a = write_artifact(tmp_path / "a.edgepkg", manifest(), {"model/model.onnx": tiny_onnx()})
    b = write_artifact(tmp_path / "b.edgepkg", manifest(), {"model/model.onnx": tiny_onnx()})
    assert a.read_bytes() == b.read_bytes()


def test_a_complete_copy_extracted_by_another_process_is_kept_not_replaced(good, tmp_path):
    """Two loaders race: the second must not delete the folder the first is reading."""
    from edgeml.runtime.artifact import _install_folder

    first = open_artifact(good, cache_dir=tmp_path / "cache")
    inode_before = first.directory.stat().st_ino
    staging = tmp_path / "cache" / ".staging"
    staging.mkdir()
    for name in first.manifest["files"]:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes((first.directory / name).read_bytes())
    _install_folder(staging, first.directory, first.typed.files)
    assert first.directory.stat().st_ino == inode_before   # the reader's folder is untouched
    assert not staging.exists()


def test_a_damaged_extracted_copy_is_replaced_on_the_next_load(good, tmp_path):
    first = open_artifact(good, cache_dir=tmp_path / "cache")
    member = next(iter(first.manifest["files"]))
    (first.directory / member).write_bytes(b"damaged")
    again = open_artifact(good, cache_dir=tmp_path / "cache")
    assert (again.directory / member).read_bytes() != b"damaged"
    assert again.directory == first.directory
