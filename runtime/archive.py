"""Reading an ``.edgepkg`` ZIP as hostile input: bounded, canonical, streamed.

* The member count and the central directory size are checked from the end
  record BEFORE ``zipfile`` builds its list (a 200,000-entry archive costs
  nothing to refuse).
* Every member name must be canonical (``manifest.canonical_member_problem``),
  UTF-8, unique after NFC + case folding, a plain file (no link, folder,
  encryption or exotic compression).
* Members are hashed in ``CHUNK_BYTES`` chunks, never read whole; reading stops
  at the declared size + 1 byte; the declared total is capped.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from edgeml.errors import ArtifactError, summarize_names
from edgeml.runtime.manifest import MAX_FILES, FileEntry, canonical_member_problem, collision_key

CHUNK_BYTES = 1 << 20
MAX_MEMBERS = MAX_FILES + 2                 # listed files + manifest.json + manifest.sig
MAX_TOTAL_BYTES = int(os.environ.get("EDGEML_MAX_ARTIFACT_BYTES", 8 << 30))   # uncompressed, all members
CENTRAL_DIRECTORY_BYTES_PER_MEMBER = 256    # a generous average (46-byte header + name + extras)
_ALLOWED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class ArchiveLimits:
    """What one artifact may cost to read; pass your own to ``open_artifact`` / ``verify_archive``."""

    max_members: int = MAX_MEMBERS
    max_total_bytes: int = MAX_TOTAL_BYTES
    chunk_bytes: int = CHUNK_BYTES


DEFAULT_LIMITS = ArchiveLimits()


def open_zip(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        check_artifact_path(path)
    try:
        with open(path, "rb") as fh:
            entries, cd_size = _end_record(fh)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if entries > limits.max_members or cd_size > limits.max_members * CENTRAL_DIRECTORY_BYTES_PER_MEMBER:
        raise ArtifactError(
            f"{path} has {entries} members ({cd_size} bytes of directory); an artifact may hold at most "
            f"{limits.max_members}", hint="this is not an artifact edgeml wrote; do not load it")
    try:
        return zipfile.ZipFile(path)
    except (*_READ_ERRORS, ValueError) as exc:  # ValueError: a name flagged UTF-8 that is not
        if path.suffix.lower() == ".onnx":
            raise ArtifactError(f"{path} is an ONNX model, not an artifact: compile it first",
                                hint=f"edgeml compile {path} --target TARGET -o {path.with_suffix('.edgepkg').name}"
                                     " (edgeml targets lists them)") from None
        raise ArtifactError(f"{path} is not a readable .edgepkg (truncated or not an artifact): {exc}",
                            hint="re-download or recompile it") from None


def check_artifact_path(path: Path) -> None:
    """One message per way an artifact path can be wrong: missing, a folder, not a regular file (exit 7)."""
    if not path.exists():
        folder = path.parent
        where = "" if folder.is_dir() else f" (nor does its folder {folder})"
        raise ArtifactError(f"artifact {path} does not exist{where}",
                            hint="check the path; edgeml compile MODEL -t TARGET -o FILE.edgepkg writes one")
    if path.is_dir():
        raise ArtifactError(f"artifact {path} is a folder, not an .edgepkg file",
                            hint="pass the .edgepkg file inside it")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} is not a regular file", hint="pass an .edgepkg file")


def _end_record(fh: BinaryIO) -> tuple[int, int]:
    """(entries, central directory bytes) from the ZIP end record; (0, 0) when there is none."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_len = min(size, 22 + 0xFFFF + 20)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        return 0, 0                                 # zipfile will say it is not a ZIP
    entries, cd_size = struct.unpack("<HI", tail[pos + 10:pos + 16])
    locator = tail[pos - 20:pos] if pos >= 20 else b""
    if locator[:4] == b"PK\x06\x07":                # ZIP64: the real figures are in the ZIP64 end record
        (offset,) = struct.unpack("<Q", locator[8:16])
        fh.seek(offset)
        record = fh.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            entries, cd_size = struct.unpack("<QQ", record[32:48])
    return entries, cd_size


def check_members(zf: zipfile.ZipFile, path: Path, limits: ArchiveLimits) -> dict[str, zipfile.ZipInfo]:
    """Every member canonical, unique (also after NFC + case folding), a plain file; by name."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArtifactError(f"{path} has {len(infos)} members; an artifact may hold at most {limits.max_members}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    by_key: dict[str, str] = {}
    for info in infos:
        raw_name = info.orig_filename                # zipfile cuts names at NUL; the original shows it
        problem = canonical_member_problem(raw_name)
        if problem is None and not info.flag_bits & 0x800 and not raw_name.isascii():
            problem = "is not a UTF-8 name"
        if problem is not None:
            raise ArtifactError(f"{path}: member {raw_name!r} {problem}; refusing to read the artifact",
                                hint="artifacts hold plain relative names; do not load this one")
        key = collision_key(raw_name)
        if key in by_key:
            raise ArtifactError(f"{path}: members {by_key[key]!r} and {raw_name!r} name the same file "
                                "(duplicate, or equal after Unicode normalization / case folding)")
        by_key[key] = raw_name
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode) or stat.S_ISDIR(mode) or info.is_dir():
            raise ArtifactError(f"{path}: member {raw_name!r} is a link or folder; artifacts hold files only")
        if info.flag_bits & 0x1 or info.compress_type not in _ALLOWED_COMPRESSION:
            raise ArtifactError(f"{path}: member {raw_name!r} is encrypted or uses an unsupported compression")
        by_name[raw_name] = info
    return by_name


def check_listing(infos: dict[str, zipfile.ZipInfo], listed: Mapping[str, FileEntry], path: Path,
                  reserved: frozenset[str], limits: ArchiveLimits) -> None:
    """Members present == members listed, sizes as declared, total under the cap (set/dict lookups only)."""
    extra = [n for n in infos if n not in listed and n not in reserved]
    if extra:
        raise ArtifactError(f"{path}: members {summarize_names(sorted(extra))} are not listed in the manifest "
                            "(tampered?)")
    missing = [n for n in listed if n not in infos]
    if missing:
        raise ArtifactError(f"{path}: members {summarize_names(sorted(missing))} listed in the manifest are "
                            "missing (truncated?)")
    total = sum(entry.size for entry in listed.values())
    if total > limits.max_total_bytes:
        raise ArtifactError(f"{path}: members total {total} bytes uncompressed, over the "
                            f"{limits.max_total_bytes}-byte limit", hint="raise ArchiveLimits.max_total_bytes "
                            "(EDGEML_MAX_ARTIFACT_BYTES) if this device really runs such a model")
    for name, entry in listed.items():
        if infos[name].file_size != entry.size:
            raise ArtifactError(f"{path}: member '{name}' is {infos[name].file_size} bytes, manifest says "
                                f"{entry.size}")


def read_small_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, limit: int) -> bytes:
    """A member that must be small (manifest, signature), read with a hard cap."""
    if info.file_size > limit:
        raise ArtifactError(f"{path}: member '{info.filename}' is {info.file_size} bytes, over the {limit}-byte limit")
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)
    except _READ_ERRORS as exc:
        raise ArtifactError(f"{path}: member '{info.filename}' is corrupt ({exc})",
                            hint="re-download or recompile it") from None
    if len(data) > limit:
        raise ArtifactError(f"{path}: member '{info.filename}' is over the {limit}-byte limit")
    return data


def stream_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, entry: FileEntry, path: Path,
                  sink: BinaryIO | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Hash a member in chunks (copying it to ``sink``); refuse a size or sha256 other than declared."""
    digest = hashlib.sha256()
    got = 0
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(min(chunk_bytes, entry.size + 1 - got))
                if not chunk:
                    break
                got += len(chunk)
                if got > entry.size:
                    raise ArtifactError(f"{path}: member '{info.filename}' holds more than the {entry.size} "
                                        "bytes the manifest declares (tampered or corrupt)")
                digest.update(chunk)
                if sink is not None:
                    sink.write(chunk)
    except _READ_ERRORS as exc:
        raise ArtifactError(f"{path}: member '{info.filename}' is corrupt ({exc})",
                            hint="re-download or recompile it") from None
    if got != entry.size or digest.hexdigest() != entry.sha256:
        raise ArtifactError(f"{path}: member '{info.filename}' does not match its sha256 in the manifest "
                            "(tampered or corrupt)", hint="re-download or recompile it; do not run this artifact")


def file_matches(path: Path, entry: FileEntry, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """A regular file (not a link) of exactly the declared size and sha256, read in chunks."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_bytes), b""):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == entry.sha256
