"""The two code versions a regression run compares: the working tree and BASE_REF, each importable on its own.

A side is a folder ``<root>/edgeml`` of symbolic links laid out the way the version's own ``pyproject.toml``
maps its packages (``edgeml.runtime`` = ``runtime/`` ...), put first on ``PYTHONPATH`` of the processes that run
that side's code. Both sides use this interpreter and its installed dependencies; nothing is installed, and the
venv's own editable ``edgeml`` is shadowed (a ``PYTHONPATH`` entry is searched before the editable finder).
BASE_REF is checked out with ``git worktree add --detach`` under the temp folder and reused by later runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgeml.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    label: str            # "head" or "base"
    ref: str              # what the user named ("working tree" for head)
    commit: str
    tree: Path            # the checkout
    root: Path            # PYTHONPATH entry holding the ``edgeml`` link farm
    env: dict[str, str] = field(default_factory=dict)

    def python(self, code: str, *args: str, timeout: float = 600, cwd: Path | None = None) -> str:
        """Run ``code`` in a fresh interpreter on this side's code; its stdout (raises with stderr on failure)."""
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=self.env,
                             cwd=cwd or self.root, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{self.label} ({self.commit[:10]}): {out.stderr.strip()[-800:]}")
        return out.stdout

    def has(self, relpath: str) -> bool:
        return (self.tree / relpath).exists()


def _git(*args: str, cwd: Path = REPO) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UsageError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def link_farm(tree: Path, root: Path) -> Path:
    """``root/edgeml`` laid out per ``tree/pyproject.toml``'s package-dir (idempotent)."""
    cfg = tomllib.loads((tree / "pyproject.toml").read_text())
    mapping = cfg.get("tool", {}).get("setuptools", {}).get("package-dir", {}) or {"edgeml": "edgeml"}
    pkg = root / "edgeml"
    pkg.mkdir(parents=True, exist_ok=True)
    base = tree / mapping.get("edgeml", "edgeml")
    for entry in base.iterdir():
        if entry.name == "__pycache__":
            continue
        link = pkg / entry.name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(entry)
    for name, folder in mapping.items():
        if name == "edgeml" or not name.startswith("edgeml.") or name.count(".") != 1:
            continue
        link = pkg / name.split(".", 1)[1]
        if not link.is_symlink() and not link.exists():
            link.symlink_to(tree / folder)
    return root


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def head_side(work: Path) -> Side:
    """The working tree as it is (uncommitted changes included)."""
    commit = _git("rev-parse", "HEAD")
    root = link_farm(REPO, work / "head-root")
    return Side("head", "working tree", commit, REPO, root, _env(root))


def remove_base(side: Side) -> None:
    """Unregister and delete BASE_REF's checkout (``--remove-base``); later runs check it out again."""
    subprocess.run(["git", "worktree", "remove", "--force", str(side.tree)], cwd=REPO, capture_output=True)
    if side.tree.parent.name.startswith(f"edgeml-regress-{side.commit[:12]}-"):   # a private checkout's folder
        import shutil

        shutil.rmtree(side.tree.parent, ignore_errors=True)


def base_side(ref: str, private: bool = False) -> Side:
    """BASE_REF checked out beside the working tree (a detached git worktree in the temp folder, reused by later
    runs; ``private``: a checkout of this run's own, which no concurrent run can remove under it)."""
    try:
        commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    except UsageError:
        raise UsageError(f"BASE_REF {ref!r} is not a commit of {REPO}",
                         hint="give a commit, tag or branch, e.g. HEAD~1 or `git log --until=2026-11-28 -1 --format=%h`") from None
    if private:
        tree = Path(tempfile.mkdtemp(prefix=f"edgeml-regress-{commit[:12]}-")) / "tree"
    else:
        tree = Path(tempfile.gettempdir()) / f"edgeml-regress-{commit[:12]}"
    if not (tree / "pyproject.toml").exists():
        _git("worktree", "add", "--detach", "--force", str(tree), commit)
    root = link_farm(tree, tree / ".regress-root")
    return Side("base", ref, commit, tree, root, _env(root))
