"""The extraction cache: content-addressed folders of verified members, bounded, shared safely.

* A folder is built under a temp name and renamed into place; concurrent loaders
  never delete a good copy (whoever renames first wins).
* A loaded model holds a shared ``flock`` on its folder (a ``Lease``) for as long
  as it is open. Eviction takes an exclusive, non-blocking lock, so a folder some
  process uses is never evicted; it is renamed aside, then removed.
* The cache keeps at most ``CacheLimits.max_entries`` folders and
  ``max_bytes`` bytes; the least recently used (folder mtime, touched on each
  load) go first. Staging folders left by a crashed loader are removed after an hour.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from edgeml.errors import ArtifactError
from edgeml.runtime.archive import file_matches
from edgeml.runtime.manifest import FileEntry

MAX_CACHE_ENTRIES = 8
MAX_CACHE_BYTES = 4 << 30
STALE_STAGING_SECONDS = 3600


@dataclass(frozen=True)
class CacheLimits:
    max_entries: int = MAX_CACHE_ENTRIES
    max_bytes: int = MAX_CACHE_BYTES


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeml" / "artifacts"


def extracted_ok(folder: Path, files: Mapping[str, FileEntry]) -> bool:
    """An extracted copy is reused only when every member is still a regular file matching its hash."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return all(file_matches(folder / name, entry) for name, entry in files.items())


def install_folder(staging: Path, final: Path, files: Mapping[str, FileEntry]) -> None:
    """Move a verified staging folder into place without pulling a good copy from under a reader.

    Whoever renames first wins, the others discard their staging copy. Only a
    damaged copy is moved aside (never deleted in place) before the new one takes its name.
    """
    for _ in range(3):
        try:
            os.replace(staging, final)
            return
        except OSError:
            if extracted_ok(final, files):
                shutil.rmtree(staging, ignore_errors=True)
                return
            aside = final.with_name(f".{final.name}.damaged.{os.getpid()}")
            try:
                os.replace(final, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise ArtifactError(f"could not install the extracted artifact into {final}")


class Lease:
    """A shared lock on an extracted folder: while held, no eviction removes it."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    @classmethod
    def take(cls, folder: Path) -> "Lease | None":
        """Lock ``folder`` shared; None when it vanished or was replaced meanwhile (caller retries)."""
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)       # an evictor holds LOCK_EX only while renaming the folder away
        try:
            same = os.stat(folder).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return None
        try:
            os.utime(folder)                 # most recently used
        except OSError:
            pass
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def evict(root: Path, keep: Path, limits: CacheLimits) -> list[Path]:
    """Remove least-recently-used extracted folders nobody holds until the cache fits; returns them."""
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    now = time.time()
    folders: list[tuple[float, int, Path]] = []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(path, ignore_errors=True)   # a crashed loader's staging or damaged copy
            continue
        folders.append((entry.stat(follow_symlinks=False).st_mtime, _folder_bytes(path), path))
    folders.sort()
    count, total = len(folders), sum(size for _, size, _ in folders)
    for _, size, path in folders:
        if count <= limits.max_entries and total <= limits.max_bytes:
            break
        if path == keep or not _remove_unused(path):
            continue
        removed.append(path)
        count, total = count - 1, total - size
    return removed


def _remove_unused(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False                     # a process holds it: in use
        aside = folder.with_name(f".{folder.name}.evicted.{os.getpid()}")
        try:
            os.replace(folder, aside)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
