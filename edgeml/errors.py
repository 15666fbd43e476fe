"""The one exception tree of edgeml.

Every error a user can cause or meet is an ``EdgemlError``; the CLI prints its
message (never a traceback) and exits with its ``exit_code``.

    EdgemlError                      exit 1   root; ``hint`` says what to do
    ├── UsageError                   exit 2   bad option / argument combination
    ├── MissingDependency            exit 3   an optional package is not installed
    ├── RegistryError                exit 2   unknown or duplicate registry name
    ├── TargetError                  exit 2   unknown target, malformed target file
    │   └── UnsupportedHost          exit 4   host lacks the CPU features a target/artifact needs
    ├── ModelError                   exit 5   unreadable model, missing input shape, shape mismatch
    │   └── UnsupportedOp            exit 5   an op a backend cannot compile (names op + backend)
    ├── DataError                    exit 5   calibration / eval / input ``.npz`` problems
    ├── CompileError                 exit 6   no candidate could be built or passed the gates
    │   ├── AccuracyError            exit 6   every candidate dropped more accuracy than allowed
    │   └── CandidateFailed          exit 6   a candidate's worker crashed, hung or passed its memory limit
    ├── ArtifactError                exit 7   malformed, truncated, tampered or unsafe ``.edgepkg``
    │   └── SignatureError           exit 7   unsigned when required, wrong key, bad signature
    ├── BackendError                 exit 8   a backend failed at load or run time
    ├── ServeError                   exit 9   runtime server problems (bad request payloads map to 400)
    └── FleetError                   exit 10  fleet protocol / rollout / store problems
        └── MessageRejected          exit 10  malformed, oversized, wrongly-signed or replayed message
"""

from __future__ import annotations

from typing import Iterable


class EdgemlError(Exception):
    """Root of every edgeml error. ``hint`` tells the user what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}


class UsageError(EdgemlError):
    exit_code = 2


class MissingDependency(EdgemlError):
    exit_code = 3


class RegistryError(EdgemlError):
    exit_code = 2


class TargetError(EdgemlError):
    exit_code = 2


class UnsupportedHost(TargetError):
    exit_code = 4


class ModelError(EdgemlError):
    exit_code = 5


class UnsupportedOp(ModelError):
    exit_code = 5


class DataError(EdgemlError):
    exit_code = 5


class CompileError(EdgemlError):
    exit_code = 6


class AccuracyError(CompileError):
    exit_code = 6


class CandidateFailed(CompileError):
    """A candidate's isolated worker died (``signal`` names the signal), hung or passed its memory limit.

    The compile records it on that candidate and goes on; it reaches the user only when no candidate is left.
    """

    exit_code = 6

    def __init__(self, message: str, *, hint: str | None = None, signal: str | None = None):
        super().__init__(message, hint=hint)
        self.signal = signal


class ArtifactError(EdgemlError):
    exit_code = 7


class SignatureError(ArtifactError):
    exit_code = 7


class BackendError(EdgemlError):
    exit_code = 8


class ServeError(EdgemlError):
    exit_code = 9


class FleetError(EdgemlError):
    exit_code = 10


class MessageRejected(FleetError):
    exit_code = 10


def summarize_names(names: "Iterable[object]", limit: int = 10) -> str:
    """``'a', 'b', ... and N more``: an error lists at most ``limit`` names, never 200,000."""
    shown: list[str] = []
    total = 0
    for name in names:
        total += 1
        if len(shown) < limit:
            text = repr(name)
            shown.append(text if len(text) <= 120 else text[:117] + "...")
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def require(module: str, extra: str = "compiler", *, feature: str | None = None):
    """Import an optional heavy package or raise MissingDependency naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        what = feature or module
        raise MissingDependency(
            f"{what} needs the Python package '{module.split('.')[0]}', which is not installed ({exc})",
            hint=f"pip install 'edgeml[{extra}]'",
        ) from exc
