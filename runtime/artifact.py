"""The ``.edgepkg`` artifact: one deterministic ZIP file.

Members::

    manifest.json        canonical JSON (sorted keys), ``schema_version`` = 1 (schema: runtime/manifest.py)
    manifest.sig         optional Ed25519 signature over manifest.json's exact bytes
    model/...            backend files (model.onnx, model.xml + model.bin, model.so + params)
    selftest/golden.npz  golden inputs (``in:NAME``) and outputs (``out:NAME``) for the device self-test

The manifest lists every other member with its sha256 and size, so signing the
manifest signs the whole artifact. Writing is reproducible: members in sorted
order, fixed timestamps and permissions, deflate; the same inputs give the same
bytes. Reading treats the file as hostile (runtime/archive.py): bounded, canonical
names, streamed hashes. See docs/artifact.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from edgeml.errors import ArtifactError, SignatureError
from edgeml.runtime import signing
from edgeml.runtime.archive import (DEFAULT_LIMITS, ArchiveLimits, check_listing, check_members, open_zip,
                                    read_small_member, stream_member)
from edgeml.runtime.cache import (CacheLimits, Lease, default_cache_dir, evict, extracted_ok, install_folder)
from edgeml.runtime.fsutil import atomic_path, fsync_dir
from edgeml.runtime.golden import golden_npz_bytes, read_golden
from edgeml.runtime.manifest import SCHEMA_VERSION, Manifest, parse_json, require_canonical_member

__all__ = ["SCHEMA_VERSION", "MANIFEST", "SIGNATURE", "SELFTEST_FILE", "ArchiveLimits", "CacheLimits",
           "CheckedArchive", "VerifiedArtifact", "Manifest", "artifact_sha256", "canonical_json",
           "default_cache_dir", "golden_npz_bytes", "open_artifact", "read_golden", "read_manifest",
           "validate_manifest", "verify_archive", "verify_zip", "write_artifact"]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESERVED = frozenset({MANIFEST, SIGNATURE})
SELFTEST_FILE = "selftest/golden.npz"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
MAX_MANIFEST_BYTES = 8 << 20
MAX_SIGNATURE_BYTES = 1 << 16


def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_manifest(manifest: object, where: str = "manifest") -> Manifest:
    """Validate a manifest object against the typed schema; returns the typed ``Manifest``."""
    return Manifest.from_dict(manifest, where)


def write_artifact(
    output: Path,
    manifest: dict[str, Any],
    files: Mapping[str, Path | bytes],
    *,
    sign_key: Path | None = None,
) -> Path:
    """Write an artifact atomically. ``files`` maps member name → path or bytes.

    Fills ``manifest['files']`` from the contents (the caller's dict is updated) and
    refuses a manifest that ``Manifest.from_dict`` would refuse at load.
    """
    contents: dict[str, bytes] = {}
    for name, src in files.items():
        require_canonical_member(name, "artifact")
        if name in RESERVED:
            raise ArtifactError(f"member name {name!r} is reserved")
        contents[name] = src if isinstance(src, bytes) else Path(src).read_bytes()
    manifest["files"] = {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in sorted(contents.items())}
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    validate_manifest(manifest)
    manifest_bytes = canonical_json(manifest)
    members = [(MANIFEST, manifest_bytes)]
    if sign_key is not None:
        members.append((SIGNATURE, canonical_json(signing.sign_bytes(manifest_bytes, sign_key))))
    members += sorted(contents.items())
    output = Path(output)
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.create_system = 3
                zf.writestr(info, data, compresslevel=6)
    return output


@dataclass
class CheckedArchive:
    """An archive whose structure, manifest and signature passed; members are hashed separately."""

    path: Path
    spec: Manifest
    manifest: dict[str, Any]          # the validated plain dict (readers migrate to ``spec``)
    manifest_bytes: bytes
    signer: str | None
    infos: dict[str, zipfile.ZipInfo] = field(repr=False)


def _check_archive(zf: zipfile.ZipFile, path: Path, trusted_keys: list[Path], require_signature: bool,
                   limits: ArchiveLimits) -> CheckedArchive:
    infos = check_members(zf, path, limits)
    if MANIFEST not in infos:
        raise ArtifactError(f"{path} has no member '{MANIFEST}' (truncated or not an artifact)")
    manifest_bytes = read_small_member(zf, infos[MANIFEST], path, MAX_MANIFEST_BYTES)
    where = f"{path}: manifest"
    manifest = parse_json(manifest_bytes, where)
    spec = Manifest.from_dict(manifest, where)
    assert isinstance(manifest, dict)
    signer = None
    if SIGNATURE in infos:
        raw_sig = read_small_member(zf, infos[SIGNATURE], path, MAX_SIGNATURE_BYTES)
        signature = signing.parse_signature(raw_sig, f"{path}: {SIGNATURE}")
        if trusted_keys:
            signer = signing.verify_bytes(manifest_bytes, signature, trusted_keys)
    if require_signature and signer is None:
        raise SignatureError(
            f"{path} is unsigned, and this device requires artifacts signed by a trusted key",
            hint="compile with --sign-key KEY (edgeml keygen KEY), or pass --allow-unsigned",
        )
    check_listing(infos, spec.files, path, RESERVED, limits)
    return CheckedArchive(path, spec, manifest, manifest_bytes, signer, infos)


def _signature_default(trusted_keys: list[Path] | None, require_signature: bool | None) -> tuple[list[Path], bool]:
    keys = [Path(k) for k in trusted_keys or []]
    return keys, bool(keys) if require_signature is None else require_signature


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate the manifest only (no hash checks): cheap, for inspect."""
    path = Path(path)
    with open_zip(path) as zf:
        checked = _check_archive(zf, path, [], False, DEFAULT_LIMITS)
    return checked.manifest


def verify_archive(path: Path, *, trusted_keys: list[Path] | None = None, require_signature: bool | None = None,
                   limits: ArchiveLimits = DEFAULT_LIMITS) -> CheckedArchive:
    """Check every rule (structure, names, manifest, signature, sizes, hashes) streaming; extract nothing.

    ``require_signature`` defaults to True when trusted keys are given.
    """
    path = Path(path)
    keys, required = _signature_default(trusted_keys, require_signature)
    with open_zip(path, limits) as zf:
        checked = _check_archive(zf, path, keys, required, limits)
        for name, entry in checked.spec.files.items():
            stream_member(zf, checked.infos[name], entry, path, chunk_bytes=limits.chunk_bytes)
    return checked


class MemberBytes(Mapping[str, bytes]):
    """Members of a verified archive, read (and re-hashed) only when asked for, one at a time."""

    def __init__(self, checked: CheckedArchive):
        self._checked = checked

    def __getitem__(self, name: str) -> bytes:
        import io

        entry = self._checked.spec.files[name]
        sink = io.BytesIO()
        with open_zip(self._checked.path) as zf:
            stream_member(zf, zf.getinfo(name), entry, self._checked.path, sink)
        return sink.getvalue()

    def __iter__(self) -> Iterator[str]:
        return iter(self._checked.spec.files)

    def __len__(self) -> int:
        return len(self._checked.spec.files)


def verify_zip(path: Path, *, trusted_keys: list[Path] | None = None, require_signature: bool | None = None,
               ) -> tuple[dict[str, Any], Mapping[str, bytes], str | None, bytes]:
    """``verify_archive`` as (manifest dict, lazily read members, signer key id, manifest bytes)."""
    checked = verify_archive(path, trusted_keys=trusted_keys, require_signature=require_signature)
    return checked.manifest, MemberBytes(checked), checked.signer, checked.manifest_bytes


def artifact_sha256(path: Path) -> str:
    return signing.file_sha256(Path(path))


@dataclass
class VerifiedArtifact:
    path: Path
    manifest: dict[str, Any]          # validated plain dict; new code reads ``spec``
    directory: Path                   # where the verified members were extracted
    sha256: str                       # of the whole .edgepkg file
    signed_by: str | None             # key id, or None when unsigned
    spec: Manifest | None = None
    lease: Lease | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = Manifest.from_dict(self.manifest)

    @property
    def typed(self) -> Manifest:
        assert self.spec is not None
        return self.spec

    def member(self, name: str) -> Path:
        """The extracted path of a listed member, confined to the folder (no link, no escape)."""
        if name not in self.typed.files:
            raise ArtifactError(f"{self.path}: '{name}' is not a member listed in the manifest")
        path = self.directory
        mode = 0
        for part in name.split("/"):               # canonical: no '.', '..' or empty parts
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                raise ArtifactError(f"{self.path}: member '{name}' is missing from {self.directory}") from None
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{self.path}: member '{name}' is a link in {self.directory}; refusing it")
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{self.path}: member '{name}' is not a regular file in {self.directory}")
        return path

    @property
    def entrypoint(self) -> Path:
        return self.member(self.typed.backend.entrypoint)

    def golden(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The self-test's (inputs, outputs), re-verified against the manifest; None without golden data."""
        if self.typed.selftest is None:
            return None
        return read_golden(self.member(self.typed.selftest.file), self.typed)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


def open_artifact(
    path: Path,
    *,
    trusted_keys: list[Path] | None = None,
    require_signature: bool | None = None,
    cache_dir: Path | None = None,
    precheck: Callable[[Manifest], None] | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    cache_limits: CacheLimits = CacheLimits(),
) -> VerifiedArtifact:
    """Verify an artifact and extract it into a content-addressed folder, leased while open.

    ``precheck`` (e.g. the host's CPU features) runs after the manifest and signature
    passed and BEFORE anything is extracted. Members are streamed and hashed into a
    temp folder renamed into place, so a crash never leaves a half-extracted model.
    """
    path = Path(path)
    keys, required = _signature_default(trusted_keys, require_signature)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    with open_zip(path, limits) as zf:
        checked = _check_archive(zf, path, keys, required, limits)
        if precheck is not None:
            precheck(checked.spec)
        digest = artifact_sha256(path)
        final = root / digest[:32]
        for _ in range(3):
            if not extracted_ok(final, checked.spec.files):
                _extract(zf, checked, root, final, limits)
            lease = Lease.take(final)
            if lease is not None:
                break
        else:
            raise ArtifactError(f"could not hold the extracted copy of {path} in {root} (evicted repeatedly)")
    evict(root, keep=final, limits=cache_limits)
    return VerifiedArtifact(path=path, manifest=checked.manifest, directory=final, sha256=digest,
                            signed_by=checked.signer, spec=checked.spec, lease=lease)


def _extract(zf: zipfile.ZipFile, checked: CheckedArchive, root: Path, final: Path, limits: ArchiveLimits) -> None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name[:12]}.", dir=root))
    try:
        for name, entry in checked.spec.files.items():
            dest = staging / name                    # canonical: no '..', no absolute, no link in the zip
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as fh:
                stream_member(zf, checked.infos[name], entry, checked.path, fh, limits.chunk_bytes)
                fh.flush()
                os.fsync(fh.fileno())
        (staging / MANIFEST).write_bytes(checked.manifest_bytes)
        install_folder(staging, final, checked.spec.files)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# Kept for callers and tests written against the old names.
_install_folder = install_folder
_extracted_ok = extracted_ok
