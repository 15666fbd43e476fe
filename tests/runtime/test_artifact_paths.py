"""Issue 9 rows 2 and 3: every path the manifest names is a listed member inside the verified folder,
and every archive member name is canonical and unique."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from artifact_helpers import base_manifest, craft, listing, tiny_onnx

import edgeml
from edgeml.errors import ArtifactError
from edgeml.runtime.artifact import open_artifact, verify_archive, write_artifact
from edgeml.runtime.signing import generate_keypair

MODEL = {"model/model.onnx": tiny_onnx()}


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    return private, public


@pytest.mark.parametrize("entrypoint, match", [
    ("/etc/hostname", "absolute path"),
    ("../outside.onnx", "escapes the artifact folder"),
    ("model/../../outside.onnx", "escapes the artifact folder"),
    ("model/./model.onnx", "not in canonical form"),
    ("model/other.onnx", "not a member listed in 'files'"),
])
def test_signed_manifest_cannot_point_the_backend_outside_the_verified_files(tmp_path, keys, entrypoint, match):
    """The signature proves who wrote the manifest, not that its paths are safe: refuse them anyway."""
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(tiny_onnx())
    m = base_manifest(files=listing(MODEL))
    m["backend"]["entrypoint"] = entrypoint
    art = craft(tmp_path / "signed.edgepkg", m, MODEL, sign_key=keys[0])
    with pytest.raises(ArtifactError, match="field 'backend.entrypoint'") as info:
        edgeml.load(art, trusted_keys=[keys[1]], cache_dir=tmp_path / "c")
    assert match in info.value.message


def test_member_paths_in_backend_options_and_selftest_are_confined(tmp_path, keys):
    m = base_manifest(files=listing(MODEL))
    m["backend"]["options"] = {"params": "/etc/passwd"}
    with pytest.raises(ArtifactError, match="field 'backend.options.params'"):
        edgeml.load(craft(tmp_path / "p.edgepkg", m, MODEL, sign_key=keys[0]), trusted_keys=[keys[1]],
                    cache_dir=tmp_path / "c")
    m = base_manifest(files=listing(MODEL), selftest={"file": "../golden.npz"})
    with pytest.raises(ArtifactError, match="field 'selftest.file'.*escapes"):
        edgeml.load(craft(tmp_path / "s.edgepkg", m, MODEL), cache_dir=tmp_path / "c")


def test_a_symlink_planted_in_the_cache_is_never_followed(tmp_path):
    """An extracted member replaced by a link (same bytes) is a damaged copy: re-extracted, never opened."""
    art = write_artifact(tmp_path / "a.edgepkg", base_manifest(), MODEL)
    first = edgeml.load(art, cache_dir=tmp_path / "c")
    folder = first.artifact.directory
    first.close()
    twin = tmp_path / "elsewhere.onnx"
    twin.write_bytes(MODEL["model/model.onnx"])
    (folder / "model/model.onnx").unlink()
    (folder / "model/model.onnx").symlink_to(twin)
    again = edgeml.load(art, cache_dir=tmp_path / "c")
    entry = again.artifact.entrypoint
    assert not entry.is_symlink() and stat.S_ISREG(os.lstat(entry).st_mode)
    assert again.predict({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)
    again.close()


def test_member_lookup_refuses_unlisted_and_linked_names(tmp_path):
    art = write_artifact(tmp_path / "a.edgepkg", base_manifest(), MODEL)
    verified = open_artifact(art, cache_dir=tmp_path / "c")
    with pytest.raises(ArtifactError, match="not a member listed"):
        verified.member("../a.edgepkg")
    (verified.directory / "model/model.onnx").unlink()
    (verified.directory / "model/model.onnx").symlink_to("/etc/hostname")
    with pytest.raises(ArtifactError, match="is a link"):
        verified.member("model/model.onnx")
    verified.release()


@pytest.mark.parametrize("alias", [
    "model/./model.onnx", "model//model.onnx", "model/model.onnx/.", "./model/model.onnx", "model/model.onnx/",
    "model/Model.onnx", "MODEL/model.onnx",
])
def test_member_name_aliases_are_refused_and_nothing_is_extracted(tmp_path, alias):
    """``model/./model.onnx`` beside ``model/model.onnx`` used to be extracted over the hashed file."""
    cache = tmp_path / "c"
    art = write_artifact(tmp_path / "a.edgepkg", base_manifest(), MODEL)
    evil = tmp_path / "evil.edgepkg"
    with zipfile.ZipFile(art) as zin, zipfile.ZipFile(evil, "w") as zout:
        for member in zin.infolist():
            zout.writestr(member, zin.read(member.filename))
        zout.writestr(zipfile.ZipInfo(alias), b"unverified twin")
    with pytest.raises(ArtifactError, match="canonical form|same file|link or folder") as info:
        edgeml.load(evil, cache_dir=cache)
    assert "\n" not in info.value.message
    assert not cache.exists() or not any(cache.rglob("*.onnx"))


@pytest.mark.parametrize("name, match", [
    ("model/a\x00b.onnx", "control character"),
    ("model\\model.onnx", "backslash"),
    ("/model/model.onnx", "absolute path"),
    ("model/../x", "escapes"),
    ("C:/x", "drive letter"),
])
def test_unsafe_member_names_are_refused(tmp_path, name, match):
    # zipfile cuts names at NUL when writing: write a placeholder and patch the NUL into the bytes.
    placeholder = name.replace("\x00", "#")
    art = craft(tmp_path / "n.edgepkg", base_manifest(files=listing(MODEL)), MODEL, extra=((placeholder, b"x"),))
    art.write_bytes(art.read_bytes().replace(placeholder.encode(), name.encode()))
    with pytest.raises(ArtifactError, match=match):
        verify_archive(art)


def test_non_utf8_member_name_is_refused(tmp_path):
    art = craft(tmp_path / "n.edgepkg", base_manifest(files=listing(MODEL)), MODEL)
    info = zipfile.ZipInfo("model/caf\u00e9")
    with zipfile.ZipFile(art, "a") as zf:
        zf.writestr(info, b"x")
    data = bytearray(art.read_bytes())
    # Clear the UTF-8 flag (bit 11) in the last member's local and central headers: the name is then cp437.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        pos = data.rfind(sig)
        flag_at = pos + (6 if sig == b"PK\x03\x04" else 8)
        flags = int.from_bytes(data[flag_at:flag_at + 2], "little") & ~0x800
        data[flag_at:flag_at + 2] = flags.to_bytes(2, "little")
    Path(art).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="not a UTF-8 name"):
        verify_archive(art)


def test_manifest_listing_must_be_canonical_and_collision_free(tmp_path):
    members = {"model/model.onnx": MODEL["model/model.onnx"], "model/MODEL.onnx": b"x"}
    art = craft(tmp_path / "c.edgepkg", base_manifest(files=listing(members)), members)
    with pytest.raises(ArtifactError, match="name the same file"):
        verify_archive(art)
    with pytest.raises(ArtifactError, match="canonical form"):
        write_artifact(tmp_path / "w.edgepkg", base_manifest(), {**MODEL, "model/./x": b"x"})


@pytest.mark.parametrize("alias", ["model/./model.onnx", "model/model.onnx/.", "model//model.onnx"])
def test_a_listed_alias_cannot_overwrite_the_hashed_member(tmp_path, alias):
    """The attack of row 3: both spellings listed with their own hashes; the twin used to win on extraction."""
    members = {"model/model.onnx": MODEL["model/model.onnx"], alias: b"unverified twin"}
    art = craft(tmp_path / "twin.edgepkg", base_manifest(files=listing(members)), members)
    with pytest.raises(ArtifactError, match="not in canonical form"):
        open_artifact(art, cache_dir=tmp_path / "c")
    from edgeml.runtime.manifest import Manifest

    with pytest.raises(ArtifactError, match="field 'files'.*not in canonical form"):
        Manifest.from_dict(base_manifest(files=listing(members)))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.onnx"))
