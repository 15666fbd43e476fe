"""Fuzz the artifact reader (``runtime.artifact``: read_manifest, verify_zip, open_artifact) with crafted
.edgepkg files: random member names (aliases, traversal), sizes, manifests and raw byte damage. Only an
EdgemlError subclass may escape, nothing may be written outside the cache, and an accepted artifact's
entrypoint is a listed, verified file inside its folder (issue 9 rows 2, 3, 8, 9)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from fuzz_common import FUZZ, JSON_VALUES
from hypothesis import example, given
from hypothesis import strategies as st

from edgeml.errors import EdgemlError
from edgeml.runtime import artifact as art

MODEL_BYTES = b"not really onnx: the reader never parses it"
GOLDEN = b"golden"


def _base_manifest() -> dict[str, Any]:
    return {
        "schema_version": 1, "name": "fuzz", "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": "1.0", "entrypoint": "model/model.onnx", "options": {}},
        "precision": "fp32", "runtime": {"threads": 1},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}],
    }


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def pack(manifest: Any, members: list[tuple[str, bytes]], *, raw_manifest: bytes | None = None) -> bytes:
    """Build a zip exactly as told (no validation): what a hostile artifact author can send."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are part of the attack
        zf.writestr(zipfile.ZipInfo("manifest.json"), raw_manifest if raw_manifest is not None else
                    json.dumps(manifest).encode())
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def valid_parts() -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    members = [("model/model.onnx", MODEL_BYTES), ("selftest/golden.npz", GOLDEN)]
    manifest = _base_manifest()
    manifest["files"] = {n: _entry(d) for n, d in members}
    return manifest, members


MEMBER_NAMES = st.one_of(
    st.sampled_from(["model/model.onnx/.", "model/./model.onnx", "model//model.onnx", "../evil", "/abs/evil",
                     "model\\evil", "a/../../evil", "model/model.onnx", "manifest.json", "manifest.sig", "C:evil",
                     "x\x00y", "dir/", ".", "", "model/../model/model.onnx", "\u2215etc\u2215passwd"]),
    st.text(max_size=20))
PATHS_IN_MANIFEST = [("backend", "entrypoint"), ("runtime", "threads"), ("files",), ("inputs",), ("outputs",),
                     ("required_features",), ("schema_version",), ("name",), ("backend",), ("backend", "options"),
                     ("precision",), ("target",)]


@st.composite
def crafted_artifacts(draw) -> bytes:
    manifest, members = valid_parts()
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(PATHS_IN_MANIFEST))
        value = draw(st.one_of(JSON_VALUES, st.sampled_from(
            ["../outside.so", "/etc/passwd", "model/model.onnx/.", "model/../model/model.onnx", 100000, -1,
             "sse4_2", {"model/model.onnx": "abc"}])))
        holder = manifest
        for key in path[:-1]:
            holder = holder.setdefault(key, {}) if isinstance(holder, dict) else holder
        if isinstance(holder, dict):
            holder[path[-1]] = value
    for _ in range(draw(st.integers(0, 3))):  # extra members, listed (hash right) or not
        name = draw(MEMBER_NAMES)
        data = draw(st.binary(max_size=32))
        members.append((name, data))
        if draw(st.booleans()) and isinstance(manifest.get("files"), dict):
            manifest["files"][name] = _entry(data)
    if draw(st.integers(0, 5)) == 0:
        return pack(None, members, raw_manifest=draw(st.one_of(st.binary(max_size=64), st.sampled_from(
            [b"null", b"42", b"[]", b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000]))))
    blob = pack(manifest, members)
    if draw(st.integers(0, 4)) == 0:  # raw damage anywhere in the file
        damaged = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
        blob = bytes(damaged)
    return blob


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check_artifact_bytes(blob: bytes) -> None:
    """The property, over the three public readers, in a fresh sandbox folder."""
    with tempfile.TemporaryDirectory(prefix="edgeml-fuzz-") as sandbox:
        root = Path(sandbox)
        path = root / "in" / "a.edgepkg"
        path.parent.mkdir()
        path.write_bytes(blob)
        cache = root / "cache"
        for read in (art.read_manifest, art.verify_zip):
            try:
                read(path)
            except EdgemlError:
                pass
        try:
            opened = art.open_artifact(path, cache_dir=cache)
        except EdgemlError:
            opened = None
        outside = {p for p in _files_under(root) if not p.startswith(("cache", "in"))}
        assert not outside, f"written outside the cache: {outside}"
        assert _files_under(root / "in") == {"a.edgepkg"}
        if opened is not None:
            _check_accepted(opened)
            close = getattr(opened, "close", None)
            if callable(close):
                close()


def _check_accepted(opened: Any) -> None:
    """An accepted artifact: canonical unique names, entrypoint listed and inside its folder (rows 2, 3)."""
    files = opened.manifest["files"]
    folder = Path(opened.directory).resolve()
    normalized = [str(PurePosixPath(os.path.normpath(n))) for n in files]
    assert normalized == list(files) and len(set(normalized)) == len(files), f"non-canonical names {list(files)}"
    entry = opened.manifest["backend"]["entrypoint"]
    assert entry in files, f"entrypoint {entry!r} is not a listed file"
    assert (folder / entry).resolve().is_relative_to(folder)
    for name in files:
        assert (folder / name).resolve().is_relative_to(folder)


@FUZZ
@given(crafted_artifacts())
@example(pack(*valid_parts()))
def test_fuzz_crafted_artifacts_only_edgeml_errors(blob):
    check_artifact_bytes(blob)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_edgeml_errors(blob):
    check_artifact_bytes(blob)


# ---- regressions: named inputs from issue 9 -------------------------------------------------------------

def _with(mutate) -> bytes:
    manifest, members = valid_parts()
    mutate(manifest, members)
    return pack(manifest, members)


def _set_entrypoint(value: str):
    def mutate(manifest, members):
        manifest["backend"]["entrypoint"] = value
    return mutate


def _alias(name: str):
    def mutate(manifest, members):
        members.append((name, b"unverified twin"))
        manifest["files"][name] = _entry(b"unverified twin")
    return mutate


# case -> (mutation, a word the refusal must name)
REGRESSIONS = {
    "row2_entrypoint_absolute": (_set_entrypoint("/etc/passwd"), "entrypoint"),
    "row2_entrypoint_parent": (_set_entrypoint("../outside.so"), "entrypoint"),
    "row2_entrypoint_unlisted": (_set_entrypoint("model/other.onnx"), "entrypoint"),
    "row3_alias_trailing_dot": (_alias("model/model.onnx/."), "model/model.onnx/."),
    "row3_alias_inner_dot": (_alias("model/./model.onnx"), "model/./model.onnx"),
    "row3_alias_double_slash": (_alias("model//model.onnx"), "model//model.onnx"),
    "row9_manifest_empty": (lambda m, _: m.clear(), "manifest"),
    "row9_files_as_strings": (lambda m, _: m.__setitem__("files", {"model/model.onnx": "abc"}), "files"),
    "row9_required_features_string": (lambda m, _: m.__setitem__("required_features", "sse4_2"), "required_features"),
    "row9_shape_string": (lambda m, _: m["inputs"][0].__setitem__("shape", "abc"), "shape"),
    "row9_bad_dtype": (lambda m, _: m["inputs"][0].__setitem__("dtype", "float99"), "dtype"),
    "row8_threads_100000": (lambda m, _: m["runtime"].__setitem__("threads", 100000), "threads"),
}


def _refusal(blob: bytes) -> EdgemlError:
    check_artifact_bytes(blob)  # never a crash, never a write outside the cache
    with tempfile.TemporaryDirectory(prefix="edgeml-fuzz-") as sandbox:
        path = Path(sandbox) / "a.edgepkg"
        path.write_bytes(blob)
        with pytest.raises(EdgemlError) as info:
            art.verify_zip(path)
        return info.value


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regression_crafted_manifest_is_refused_naming_the_field(case):
    mutate, word = REGRESSIONS[case]
    error = _refusal(_with(mutate))
    assert word in str(error), str(error)
    assert len(str(error)) < 2000


@pytest.mark.parametrize("raw", [b"null", b"42", b"[" * 30000 + b"]" * 30000, b"\xff\xfe"])
def test_regression_manifest_not_an_object_is_an_edgeml_error(raw):
    _, members = valid_parts()
    error = _refusal(pack(None, members, raw_manifest=raw))
    assert "manifest" in str(error)
