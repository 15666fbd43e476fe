"""The ``.edgepkg`` artifact: one deterministic ZIP file.

Members::

    manifest.json        canonical JSON (sorted keys), ``schema_version`` = 1
    manifest.sig         optional Ed25519 signature over manifest.json's exact bytes
    model/...            backend files (model.onnx, model.xml + model.bin, model.so + params)
    selftest/golden.npz  golden inputs (``in:NAME``) and outputs (``out:NAME``) for the device self-test

The manifest lists every other member with its sha256 and size, so signing the
manifest signs the whole artifact. Writing is reproducible: members in sorted
order, fixed timestamps and permissions, deflate; the same inputs give the same
bytes. See docs/artifact.md for every manifest key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from edgeml.errors import ArtifactError, SignatureError
from edgeml.runtime.fsutil import atomic_path, fsync_dir
from edgeml.runtime import signing

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SELFTEST_FILE = "selftest/golden.npz"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
MAX_MANIFEST_BYTES = 8 << 20

REQUIRED_KEYS = (
    "schema_version", "name", "version", "target", "required_features", "arch", "backend", "precision",
    "inputs", "outputs", "files",
)


def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_member_name(name: str) -> str:
    """Reject absolute paths, '..', backslashes and empty parts (zip-slip)."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ArtifactError(f"artifact member {name!r} has an unsafe path; refusing to read it")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".", "") for p in parts) or ":" in parts[0]:
        raise ArtifactError(f"artifact member {name!r} escapes the artifact folder; refusing to read it")
    return name


def validate_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{where} lacks required keys {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where} has schema_version {manifest['schema_version']!r}; this edgeml reads {SCHEMA_VERSION}",
            hint="upgrade edgeml on this device or recompile the artifact",
        )
    backend = manifest["backend"]
    if not isinstance(backend, dict) or "name" not in backend or "entrypoint" not in backend:
        raise ArtifactError(f"{where}: 'backend' must be an object with 'name' and 'entrypoint'")
    if not isinstance(manifest["files"], dict):
        raise ArtifactError(f"{where}: 'files' must map member names to {{sha256, size}}")
    for name in manifest["files"]:
        _safe_member_name(name)
    for io_key in ("inputs", "outputs"):
        for spec in manifest[io_key]:
            if not {"name", "dtype", "shape"} <= set(spec):
                raise ArtifactError(f"{where}: every entry of '{io_key}' needs name, dtype and shape")


def write_artifact(
    output: Path,
    manifest: dict[str, Any],
    files: Mapping[str, Path | bytes],
    *,
    sign_key: Path | None = None,
) -> Path:
    """Write an artifact atomically. ``files`` maps member name → path or bytes.

    Fills ``manifest['files']`` from the contents; the caller's dict is updated.
    """
    contents: dict[str, bytes] = {}
    for name, src in files.items():
        _safe_member_name(name)
        if name in (MANIFEST, SIGNATURE):
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


def _open_zip(path: Path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist or is not a file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(
            f"{path} is not a readable .edgepkg (truncated or not an artifact): {exc}",
            hint="re-download or recompile it",
        ) from exc


def _read_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int | None = None) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ArtifactError(f"{path} has no member '{name}' (truncated or not an artifact)") from None
    if limit is not None and info.file_size > limit:
        raise ArtifactError(f"{path}: member '{name}' is {info.file_size} bytes, over the {limit}-byte limit")
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib_error()) as exc:
        raise ArtifactError(f"{path}: member '{name}' is corrupt ({exc})", hint="re-download or recompile it") from exc


def zlib_error():
    import zlib

    return zlib.error


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate the manifest only (no hash checks): cheap, for inspect."""
    with _open_zip(path) as zf:
        raw = _read_member(zf, MANIFEST, path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: manifest.json is not valid JSON ({exc})") from exc
    validate_manifest(manifest, f"{path}: manifest")
    return manifest


def artifact_sha256(path: Path) -> str:
    return signing.file_sha256(Path(path))


@dataclass
class VerifiedArtifact:
    path: Path
    manifest: dict[str, Any]
    directory: Path          # where the verified members were extracted
    sha256: str              # of the whole .edgepkg file
    signed_by: str | None    # key id, or None when unsigned

    def member(self, name: str) -> Path:
        return self.directory / _safe_member_name(name)

    @property
    def entrypoint(self) -> Path:
        return self.member(self.manifest["backend"]["entrypoint"])


def verify_zip(
    path: Path,
    *,
    trusted_keys: list[Path] | None = None,
    require_signature: bool | None = None,
) -> tuple[dict[str, Any], dict[str, bytes], str | None, bytes]:
    """Check every rule: structure, member names, sizes, hashes, signature.

    Returns (manifest, member bytes, signer key id, manifest bytes).
    ``require_signature`` defaults to True when trusted keys are given.
    """
    path = Path(path)
    trusted_keys = list(trusted_keys or [])
    if require_signature is None:
        require_signature = bool(trusted_keys)
    with _open_zip(path) as zf:
        infos = zf.infolist()
        for info in infos:
            _safe_member_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode) or info.is_dir():
                raise ArtifactError(f"{path}: member {info.filename!r} is a link or folder; artifacts hold files only")
        names = [i.filename for i in infos]
        if len(names) != len(set(names)):
            raise ArtifactError(f"{path}: duplicate member names")
        manifest_bytes = _read_member(zf, MANIFEST, path, MAX_MANIFEST_BYTES)
        try:
            manifest = json.loads(manifest_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: manifest.json is not valid JSON ({exc})") from exc
        validate_manifest(manifest, f"{path}: manifest")
        signer = None
        if SIGNATURE in names:
            sig = json.loads(_read_member(zf, SIGNATURE, path, 1 << 16))
            if trusted_keys:
                signer = signing.verify_bytes(manifest_bytes, sig, trusted_keys)
        if require_signature and signer is None:
            raise SignatureError(
                f"{path} is unsigned, and this device requires artifacts signed by a trusted key",
                hint="compile with --sign-key KEY (edgeml keygen KEY), or pass --allow-unsigned",
            )
        expected = manifest["files"]
        extra = set(names) - set(expected) - {MANIFEST, SIGNATURE}
        if extra:
            raise ArtifactError(f"{path}: members {sorted(extra)} are not listed in the manifest (tampered?)")
        contents: dict[str, bytes] = {}
        for name, meta in expected.items():
            if name not in names:
                raise ArtifactError(f"{path}: member '{name}' listed in the manifest is missing (truncated?)")
            info = zf.getinfo(name)
            if info.file_size != meta["size"]:
                raise ArtifactError(f"{path}: member '{name}' is {info.file_size} bytes, manifest says {meta['size']}")
            data = _read_member(zf, name, path)
            if sha256_bytes(data) != meta["sha256"]:
                raise ArtifactError(
                    f"{path}: member '{name}' does not match its sha256 in the manifest (tampered or corrupt)",
                    hint="re-download or recompile it; do not run this artifact",
                )
            contents[name] = data
    return manifest, contents, signer, manifest_bytes


def open_artifact(
    path: Path,
    *,
    trusted_keys: list[Path] | None = None,
    require_signature: bool | None = None,
    cache_dir: Path | None = None,
) -> VerifiedArtifact:
    """Verify an artifact and extract it into a content-addressed folder.

    The folder is built under a temp name and renamed into place, so a crash
    never leaves a half-extracted model that a later load would trust.
    """
    path = Path(path)
    manifest, contents, signer, _ = verify_zip(path, trusted_keys=trusted_keys, require_signature=require_signature)
    digest = artifact_sha256(path)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / digest[:32]
    if not _extracted_ok(final, manifest):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=root))
        try:
            for name, data in contents.items():
                dest = staging / name
                if not dest.resolve().is_relative_to(staging.resolve()):
                    raise ArtifactError(f"{path}: member {name!r} would be written outside {staging}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            (staging / MANIFEST).write_bytes(canonical_json(manifest))
            _install_folder(staging, final, manifest)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return VerifiedArtifact(path=path, manifest=manifest, directory=final, sha256=digest, signed_by=signer)


def _install_folder(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Move a verified staging folder into place without pulling a good copy from under a reader.

    Several processes may load the same artifact at once: whoever renames first
    wins, the others discard their staging copy. Only a damaged copy is moved
    aside (never deleted in place) before the new one takes its name.
    """
    for _ in range(3):
        try:
            os.replace(staging, final)
            return
        except OSError:
            if _extracted_ok(final, manifest):
                shutil.rmtree(staging, ignore_errors=True)
                return
            aside = final.with_name(f".{final.name}.damaged.{os.getpid()}")
            try:
                os.replace(final, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise ArtifactError(f"could not install the extracted artifact into {final}")


def _extracted_ok(folder: Path, manifest: dict[str, Any]) -> bool:
    """An extracted copy is reused only when every file still matches its hash."""
    if not folder.is_dir():
        return False
    for name, meta in manifest["files"].items():
        member = folder / name
        if not member.is_file() or member.stat().st_size != meta["size"]:
            return False
        if signing.file_sha256(member) != meta["sha256"]:
            return False
    return True


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeml" / "artifacts"


def golden_npz_bytes(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> bytes:
    """Deterministic .npz of golden self-test data (``in:NAME`` / ``out:NAME``)."""
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for prefix, arrays in (("in:", inputs), ("out:", outputs)):
            for name in sorted(arrays):
                arr_buf = io.BytesIO()
                np.lib.format.write_array(arr_buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{prefix}{name}.npy", date_time=_ZIP_DATE)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def read_golden(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        ins = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
        outs = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    return ins, outs
