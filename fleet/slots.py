"""Install slots and the agent's atomic journal.

Each deployment is staged in its own slot folder ``state/slots/<seq>-<sha12>/``
holding ``artifact.edgepkg``; the committed and previous slots are kept, older
ones removed after a commit. The journal (``state/journal.json``) is the single
source of truth for what is committed, what was committed before, and which
install is in flight; it is rewritten atomically (temp + fsync + rename) at
every step, so a kill -9 leaves either the old or the new file, never half.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeml.errors import FleetError
from edgeml.runtime.fsutil import atomic_write_json

JOURNAL_VERSION = 1


class Slots:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "slots"

    def folder(self, seq: int, sha256: str) -> Path:
        return self.root / f"{seq:010d}-{sha256[:12]}"

    def artifact(self, seq: int, sha256: str) -> Path:
        return self.folder(seq, sha256) / "artifact.edgepkg"

    def gc(self, keep: list[Path]) -> list[Path]:
        """Remove slot folders not in ``keep``; returns what was removed."""
        keep_set = {Path(p).resolve() for p in keep}
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if folder.resolve() not in keep_set:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed


def slot_problem(rec: dict[str, Any], trusted_keys: list[Path], require_signed: bool) -> str | None:
    """Why the slot of journal record ``rec`` must not be served (None: it is what was committed).

    The sha256 the journal recorded at commit is checked against the file; with
    trusted keys the artifact is verified again (members, signature)."""
    from edgeml.errors import EdgemlError
    from edgeml.runtime.artifact import verify_zip
    from edgeml.runtime.signing import file_sha256

    path = Path(rec["slot"])
    try:
        got = file_sha256(path)
    except OSError as exc:
        return f"slot file {path} cannot be read ({exc.strerror or exc})"
    if got != rec.get("sha256"):
        return f"slot file {path} has sha256 {got[:16]}..., the journal recorded {str(rec.get('sha256'))[:16]}..."
    if trusted_keys:
        try:
            verify_zip(path, trusted_keys=trusted_keys, require_signature=require_signed)
        except EdgemlError as exc:
            return f"slot file {path} fails verification: {exc.message}"
    return None


def _empty() -> dict[str, Any]:
    return {"schema_version": JOURNAL_VERSION, "committed": None, "previous": None, "pending": None,
            "highest_seq": -1, "event_seq": 0, "last_failed": None}


class Journal:
    """``data`` keys: committed/previous (deployment records), pending (in-flight install),
    highest_seq (replay protection), event_seq (monotonic event counter), last_failed."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "journal.json"
        self.data = self._load()

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return _empty()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            # rename is atomic, so this means someone edited the file by hand
            raise FleetError(f"agent journal {self.path} is unreadable ({exc})",
                             hint="restore it or delete it to start the device from scratch") from None
        if data.get("schema_version") != JOURNAL_VERSION:
            raise FleetError(f"agent journal {self.path} has schema_version {data.get('schema_version')!r};"
                             f" this agent reads {JOURNAL_VERSION}")
        base = _empty()
        base.update(data)
        return base

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def next_event_seq(self) -> int:
        self.data["event_seq"] += 1
        return self.data["event_seq"]
