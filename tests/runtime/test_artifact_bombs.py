"""Issue 9 row 8 (and row 13's error size): an artifact cannot make a device spend unbounded memory,
time, threads or disk. Memory is measured with tracemalloc (Python allocations), never timed."""

from __future__ import annotations

import os
import tracemalloc
import zipfile

import numpy as np
import pytest
from artifact_helpers import base_manifest, craft, listing, tiny_onnx

import edgeml
from edgeml.errors import ArtifactError, UnsupportedHost, UsageError
from edgeml.runtime.archive import ArchiveLimits
from edgeml.runtime.artifact import CacheLimits, open_artifact, read_manifest, verify_archive, write_artifact
from edgeml.runtime.golden import golden_inputs_from_archive, golden_npz_bytes

MODEL = {"model/model.onnx": tiny_onnx()}
GIB = 1 << 30


@pytest.fixture(scope="module")
def zero_bomb(tmp_path_factory):
    """A listed, correctly hashed 1 GiB member of zeros: ~1 MB on disk."""
    import hashlib

    path = tmp_path_factory.mktemp("bomb") / "bomb.edgepkg"
    chunk = bytes(1 << 20)
    digest = hashlib.sha256()
    for _ in range(GIB // len(chunk)):
        digest.update(chunk)
    m = base_manifest(files={**listing(MODEL), "model/zeros.bin": {"sha256": digest.hexdigest(), "size": GIB}})
    craft(path, m, MODEL)
    info = zipfile.ZipInfo("model/zeros.bin")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(GIB // len(chunk)):
                out.write(chunk)
    return path


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_1gib_member_is_hashed_streaming_in_bounded_memory(zero_bomb):
    assert zero_bomb.stat().st_size < 8 << 20
    assert peak_bytes(lambda: verify_archive(zero_bomb)) < 64 << 20          # was > 1 GiB: whole member read
    assert peak_bytes(lambda: read_manifest(zero_bomb)) < 16 << 20           # inspect reads no member


def test_total_uncompressed_size_is_capped_before_reading(zero_bomb):
    with pytest.raises(ArtifactError, match=r"members total \d+ bytes uncompressed, over the 1048576-byte limit"):
        verify_archive(zero_bomb, limits=ArchiveLimits(max_total_bytes=1 << 20))


@pytest.fixture(scope="module")
def many_members(tmp_path_factory):
    """50,000 tiny unlisted members (the O(n^2) membership case took 96 s)."""
    path = tmp_path_factory.mktemp("many") / "many.edgepkg"
    craft(path, base_manifest(files=listing(MODEL)), MODEL)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as zf:
        for i in range(50_000):
            zf.writestr(f"junk/{i}", b"")
    return path


def test_member_count_is_capped_from_the_end_record(many_members):
    with pytest.raises(ArtifactError, match=r"has 50002 members .* at most 10002") as info:
        verify_archive(many_members)
    assert len(str(info.value)) < 500


def test_refusal_lists_at_most_ten_names(many_members):
    """With the cap raised, the 50,000 unlisted names are refused in one short line (was 3.3 MB)."""
    with pytest.raises(ArtifactError, match="are not listed in the manifest") as info:
        verify_archive(many_members, limits=ArchiveLimits(max_members=60_000))
    assert "and 49990 more" in info.value.message and len(info.value.message) < 1000


def test_declared_size_is_compared_before_and_while_reading(tmp_path):
    m = base_manifest(files=listing(MODEL))
    m["files"]["model/model.onnx"]["size"] -= 1
    with pytest.raises(ArtifactError, match="manifest says"):
        verify_archive(craft(tmp_path / "s.edgepkg", m, MODEL))
    from edgeml.runtime.archive import open_zip, stream_member
    from edgeml.runtime.manifest import FileEntry

    art = write_artifact(tmp_path / "ok.edgepkg", base_manifest(), MODEL)
    with open_zip(art) as zf:   # a lying declared size: reading stops at size + 1, never the whole member
        with pytest.raises(ArtifactError, match="holds more than the 10 bytes"):
            stream_member(zf, zf.getinfo("model/model.onnx"), FileEntry("0" * 64, 10), art)


def test_threads_are_validated_and_clamped_to_the_host(tmp_path):
    art = write_artifact(tmp_path / "t.edgepkg", base_manifest(runtime={"threads": 4096}), MODEL)
    model = edgeml.load(art, cache_dir=tmp_path / "c")
    assert model.backend.threads == os.cpu_count()     # 4096 asked, this host's cores used
    model.close()
    for bad in (-1, 10**6, "8"):
        with pytest.raises(UsageError, match="threads must be an integer from 0"):
            edgeml.load(art, cache_dir=tmp_path / "c", threads=bad) 
    bomb = craft(tmp_path / "b.edgepkg", base_manifest(files=listing(MODEL), runtime={"threads": 100000}), MODEL)
    with pytest.raises(ArtifactError, match="field 'runtime.threads'"):
        edgeml.load(bomb, cache_dir=tmp_path / "c")


def test_host_is_checked_before_anything_is_extracted(tmp_path):
    art = write_artifact(tmp_path / "isa.edgepkg", base_manifest(required_features=["avx512_fake_feature"]), MODEL)
    with pytest.raises(UnsupportedHost, match="avx512_fake_feature"):
        edgeml.load(art, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_extraction_cache_is_bounded_and_never_evicts_a_folder_in_use(tmp_path):
    cache, limits = tmp_path / "c", CacheLimits(max_entries=2)
    arts = [write_artifact(tmp_path / f"{v}.edgepkg", base_manifest(version=v), MODEL) for v in ("1", "2", "3")]
    held = open_artifact(arts[0], cache_dir=cache, cache_limits=limits)     # in use for the whole test
    released = open_artifact(arts[1], cache_dir=cache, cache_limits=limits)
    released.release()
    os.utime(held.directory, (1, 1))            # the held one is the least recently used: still kept
    newest = open_artifact(arts[2], cache_dir=cache, cache_limits=limits)
    kept = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert kept == sorted([held.directory.name, newest.directory.name])
    assert (held.directory / "model/model.onnx").is_file() and not released.directory.exists()
    held.release()
    newest.release()


def test_cache_count_bound_applies_to_plain_loads(tmp_path):
    cache = tmp_path / "c"
    for v in range(10):
        model = edgeml.load(write_artifact(tmp_path / f"{v}.edgepkg", base_manifest(version=str(v)), MODEL),
                            cache_dir=cache)
        model.close()
    from edgeml.runtime.cache import MAX_CACHE_ENTRIES

    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == MAX_CACHE_ENTRIES


def _golden_artifact(tmp_path):
    x = np.ones((1, 4), np.float32)
    y = x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    files = {**MODEL, "selftest/golden.npz": golden_npz_bytes({"x": x}, {"y": y})}
    return write_artifact(tmp_path / "g.edgepkg", base_manifest(selftest={"file": "selftest/golden.npz"}), files)


def test_golden_data_is_verified_wherever_it_is_read(tmp_path):
    art = _golden_artifact(tmp_path)
    model = edgeml.load(art, cache_dir=tmp_path / "c")
    assert model.selftest().passed
    assert list(golden_inputs_from_archive(art)) == ["x"]
    golden = model.artifact.member("selftest/golden.npz")
    golden.write_bytes(golden_npz_bytes({"x": np.zeros((1, 4), np.float32)}, {"y": np.zeros((1, 3), np.float32)}))
    result = model.selftest()
    assert not result.passed and "does not match its sha256" in (result.reason or "")
    model.close()
    tampered = tmp_path / "t.edgepkg"
    with zipfile.ZipFile(art) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:-1] + b"\x01" if info.filename.endswith(".npz") else data)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        golden_inputs_from_archive(tampered)


def test_golden_data_must_match_the_declared_inputs(tmp_path):
    files = {**MODEL, "selftest/golden.npz": golden_npz_bytes({"x": np.ones((1, 4), np.float64)}, {})}
    art = write_artifact(tmp_path / "g.edgepkg", base_manifest(selftest={"file": "selftest/golden.npz"}), files)
    with pytest.raises(ArtifactError, match="golden input 'x' .* is float64; the manifest declares float32"):
        golden_inputs_from_archive(art)


def test_a_folder_held_by_another_process_is_never_evicted(tmp_path):
    import subprocess
    import sys

    cache, limits = tmp_path / "c", CacheLimits(max_entries=1)
    a, b = (write_artifact(tmp_path / f"{v}.edgepkg", base_manifest(version=v), MODEL) for v in ("1", "2"))
    code = ("import sys\nfrom edgeml.runtime.artifact import open_artifact\n"
            f"art = open_artifact({str(a)!r}, cache_dir={str(cache)!r})\n"
            "print(art.directory, flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        held = holder.stdout.readline().strip()
        assert held, "the holder process did not load the artifact"
        mine = open_artifact(b, cache_dir=cache, cache_limits=limits)   # over the bound: only unheld folders go
        assert (cache / held.rsplit("/", 1)[-1] / "model/model.onnx").is_file()
        mine.release()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    again = open_artifact(b, cache_dir=cache, cache_limits=limits)     # holder gone: now it can be evicted
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [again.directory.name]
    again.release()
