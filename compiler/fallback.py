"""``edgeml compile --keep-fallback``: keep a second build of the model beside the chosen one.

The fallback is the best passing candidate of ANOTHER backend than the selected one (chosen by
the same rules as the primary: fastest measured, else the static order); when no other backend
passed, the FP32 candidate of the selected backend (unless the primary is that one). It is written
as a sibling artifact, ``<out-stem>.fallback.edgepkg`` (same name, version and signing key), and the
primary's manifest names it in ``runtime.fallback``, which ``edgeml serve`` and the fleet agent load
when the primary fails to load or its circuit breaker opens (runtime/server/fallback.py). A device
needs both files in the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.compiler.session import Candidate, CompileSession

SUFFIX = ".fallback.edgepkg"


def fallback_path(output: Path) -> Path:
    """``model.edgepkg`` -> ``model.fallback.edgepkg`` (same folder: the manifest may name only a file)."""
    return output.with_name(output.stem + SUFFIX)


def pick_fallback(passing: list["Candidate"], chosen: "Candidate", *, measured: bool, backend_order: list[str],
                  verified: bool) -> tuple["Candidate", dict[str, Any]] | None:
    """The fallback candidate and its selection record, or None when no candidate qualifies."""
    from edgeml.compiler.select import select

    others = [c for c in passing if c is not chosen and c.spec.backend != chosen.spec.backend]
    why = "another backend than the primary"
    if not others:
        others = [c for c in passing if c is not chosen and c.spec.precision == "fp32"]
        why = "the FP32 build of the primary's backend (no other backend passed)"
    if not others:
        return None
    best, selection = select(others, measured=measured, backend_order=backend_order, verified=verified)
    selection = {**selection, "reason": f"fallback of {chosen.spec.label}, {why}: {selection['reason']}"}
    return best, selection


def write_fallback(s: "CompileSession", passing: list["Candidate"], chosen: "Candidate", *,
                   measured: bool, verified: bool) -> str | None:
    """Write the fallback artifact beside ``s.opts.output``; return its file name (for ``runtime.fallback``)."""
    from edgeml.compiler import pipeline

    picked = pick_fallback(passing, chosen, measured=measured, backend_order=list(s.target.backends),
                           verified=verified)
    if picked is None:
        s.say("--keep-fallback: no other passing candidate (another backend, or FP32), so no fallback is written")
        return None
    fallback, selection = picked
    selection["host_runs_target"] = s.target.runs_on_host()
    out = fallback_path(s.opts.output)
    s.say(f"fallback {fallback.spec.label} -> {out.name}")
    # its own manifest lists the same candidates, with itself as the selected one
    statuses = (chosen.status, fallback.status)
    chosen.status, fallback.status = "passed" if verified else "unverified", "selected"
    try:
        manifest, golden = pipeline._manifest(s, fallback, selection)
    finally:
        chosen.status, fallback.status = statuses
    assert fallback.built is not None
    files: dict[str, Any] = {**fallback.built.files, pipeline.SELFTEST_FILE: golden}
    unsigned = s.workdir / "fallback-unsigned.edgepkg"
    pipeline.write_artifact(unsigned, dict(manifest), files)
    pipeline._emit_from_cache(unsigned, _with_output(s, out))
    return out.name


def _with_output(s: "CompileSession", out: Path) -> Any:
    import dataclasses

    return dataclasses.replace(s.opts, output=out)
