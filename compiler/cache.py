"""Compile cache: a finished artifact keyed by a hash of everything that affects it.

Key = sha256 of canonical JSON: model bytes' sha256, calibration and eval
files' sha256, the options that shape the artifact, the target file's bytes,
the versions of every tool involved, edgeml's version and SOURCE_DATE_EPOCH.
Entries are ``<dir>/<key[:2]>/<key>.edgepkg`` (unsigned) + ``<key>.json``
(the compile report), written atomically. Default folder
``$XDG_CACHE_HOME/edgeml/compile`` (``~/.cache/edgeml/compile``).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgeml.runtime.fsutil import atomic_path, atomic_write_json


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeml" / "compile"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the source of the code that shapes artifacts (compiler, runtime, targets).

    The version number alone misses edits between releases (and editable installs),
    which would otherwise keep returning artifacts built by older code.
    """
    import edgeml

    root = Path(edgeml.__file__).resolve().parent
    packages = [Path(str(__import__(f"edgeml.{name}", fromlist=["_"]).__file__)).resolve().parent
                for name in ("compiler", "backends", "runtime", "targets")] + [root]
    digest = hashlib.sha256()
    for folder in packages:
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class CompileCache:
    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.edgepkg", folder / f"{key}.json"

    def get(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        artifact, report = self._paths(key)
        if not (artifact.is_file() and report.is_file()):
            return None
        try:
            data = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return artifact, data

    def put(self, key: str, artifact: Path, report: dict[str, Any]) -> None:
        dest, report_path = self._paths(key)
        try:
            with atomic_path(dest) as tmp:
                shutil.copyfile(artifact, tmp)
            atomic_write_json(report_path, report)
        except OSError:  # a read-only or full cache must not fail the compile
            pass
