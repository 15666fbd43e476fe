"""null: a TEST DOUBLE backend. It compiles nothing and runs a fixed numpy function.

It exists so tests can drive the compile pipeline's rules (rejection over the
tolerance, unverified candidates, eval budgets, selection of the fastest passing
candidate, every candidate failing) in milliseconds, and to show the smallest
complete backend: this entry, ``build.py``, ``run.py`` and ``errors.py``.

Its candidates come from the ``null_candidates`` option, ``{name: knobs}``:

    precision      "fp32" (default), "fp16" or "int8"
    latency_ms     sleep per run call (default 0)
    error          fraction 0..1 of samples whose outputs are rotated by one class (default 0)
    build_fails    the build raises CompileError
    verify_fails   loading raises BackendError (failed on a host target, unverified elsewhere)
    crash          "segv" | "ill" | "abort" | "bus": running it kills its process with that signal
    crash_after    with crash: the first that many runs succeed (default 0)
    hang           running it never returns
    allocate_mb    running it allocates and touches that many MiB (and keeps them)

The last three only make sense in a compile worker process (the default isolation): they exist
to prove that a candidate's crash, hang or runaway allocation costs only that candidate.

The function: every output is the first input, flattened per sample and tiled
to the output's shape, so an ONNX ``Identity`` model's FP32 reference is matched
exactly. It is registered like any backend, works for every target when asked for
by name (``--backend null``), and is never chosen by ``--backend auto``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeml.backends.entry import Backend
from edgeml.backends.options import option
from edgeml.errors import UsageError

KNOBS: dict[str, type | tuple[type, ...]] = {"precision": str, "latency_ms": (int, float), "error": (int, float),
                                              "build_fails": bool, "verify_fails": bool, "crash": str, "crash_after": int,
                                              "hang": bool, "allocate_mb": int}
CRASH_SIGNALS = ("segv", "ill", "abort", "bus")


def check_candidates(value: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Refuse unknown knobs and wrong types up front, naming the candidate and the knob."""
    out: dict[str, dict[str, Any]] = {}
    for name, knobs in value.items():
        if not isinstance(knobs, dict):
            raise UsageError(f"null_candidates[{name!r}] must be a table of knobs, got {knobs!r}")
        for key, val in knobs.items():
            kind = KNOBS.get(key)
            if kind is None:
                raise UsageError(f"null_candidates[{name!r}] has unknown knob {key!r}",
                                 hint=f"knobs: {', '.join(KNOBS)}")
            if not isinstance(val, kind) or (kind is not bool and isinstance(val, bool)):
                raise UsageError(f"null_candidates[{name!r}].{key} = {val!r} has the wrong type")
        if knobs.get("crash", "segv") not in CRASH_SIGNALS:
            raise UsageError(f"null_candidates[{name!r}].crash must be one of {', '.join(CRASH_SIGNALS)}")
        if not 0.0 <= float(knobs.get("error", 0.0)) <= 1.0:
            raise UsageError(f"null_candidates[{name!r}].error must be between 0 and 1")
        out[str(name)] = dict(knobs)
    return out


@dataclass(frozen=True)
class Options:
    null_candidates: dict[str, Any] | None = option(
        None, "the test double's candidates, {name: {precision, latency_ms, error, build_fails, verify_fails, crash, "
        "crash_after, hang, allocate_mb}}",
        check=check_candidates)


BACKEND = Backend(
    name="null",
    summary="test double: builds instantly, runs a numpy function with knobs for latency, error and failures",
    options=Options,
    build="edgeml.backends.null.build:NullCompiler",
    run="edgeml.backends.null.run:NullBackend",
    errors="edgeml.backends.null.errors:TABLE",
    portable_code=True,
    auto=False,
    any_target=True,
)
