"""Where a model's fallback comes from, and retrying a primary that failed to load.

A fallback is another artifact of the same model (e.g. the CPU FP32 build beside a GPU
FP16 or NPU build): named by the serve config (``ModelServer.load(..., fallback=PATH)``,
``edgeml serve --fallback ART=FALLBACK``) or by the artifact's manifest
(``runtime.fallback``: a file name in the artifact's own folder, never a path, so an
artifact cannot point the server anywhere else).

* The primary fails to load: the fallback is loaded and served in its place
  (``LoadedModel.stand_in_for`` says why) and the primary is retried with exponential
  backoff (``PrimaryRetry``) until it loads or the stand-in is unloaded.
* The primary fails at run time: its circuit breaker opens and requests go to the
  fallback (``DataPlane._route``); half-open probes retry the primary with backoff.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgeml.errors import EdgemlError, ServeError
from edgeml.runtime.server.logs import LOGGER

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.runtime.manifest import Manifest
    from edgeml.runtime.server.repository import LoadedModel

log = logging.getLogger(LOGGER)


def declared_fallback(artifact: Path, spec: "Manifest | None" = None) -> Path | None:
    """The fallback an artifact's manifest names (``runtime.fallback``), beside the artifact; None if none.

    ``spec`` is the verified manifest when the primary loaded; without it (the primary failed to
    load) the manifest is read and schema-checked, but not verified: only the file name is used,
    and the fallback is then loaded with every check (hashes, signature) of its own."""
    if spec is None:
        from edgeml.runtime.artifact import read_manifest
        from edgeml.runtime.manifest import Manifest

        try:
            spec = Manifest.from_dict(read_manifest(artifact))
        except EdgemlError:
            return None
    if spec.runtime is None or spec.runtime.fallback is None:
        return None
    path = artifact.parent / spec.runtime.fallback
    if not path.is_file():
        raise ServeError(f"{artifact}: manifest field 'runtime.fallback' names {spec.runtime.fallback!r}, "
                         f"which is not a file beside it in {artifact.parent}",
                         hint="copy the fallback artifact next to the primary, or give --fallback ART=FALLBACK")
    return path


class PrimaryRetry:
    """Retry loading a primary in the background, doubling the wait each time (``first_s`` .. ``max_s``).

    ``attempt()`` loads the primary and installs it (raising on failure); ``alive()`` says whether
    retrying still makes sense (the stand-in is still served and the server is running)."""

    def __init__(self, artifact: Path, attempt: Callable[[], object], alive: Callable[[], bool],
                 first_s: float = 5.0, max_s: float = 300.0):
        self.artifact = artifact
        self.attempt = attempt
        self.alive = alive
        self.delay_s = first_s
        self.max_s = max_s
        self.tries = 0
        self._timer: threading.Timer | None = None

    def schedule(self) -> None:
        self._timer = threading.Timer(self.delay_s, self._run)
        self._timer.daemon = True
        self._timer.name = "edgeml-primary-retry"
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _run(self) -> None:
        if not self.alive():
            return
        self.tries += 1
        try:
            self.attempt()
        except Exception as exc:  # noqa: BLE001 - logged; retried later
            msg = exc.message if isinstance(exc, EdgemlError) else f"{type(exc).__name__}: {exc}"
            self.delay_s = min(self.delay_s * 2.0, self.max_s)
            log.warning("primary still fails to load", extra={"artifact": str(self.artifact), "error": msg,
                                                             "tries": self.tries, "next_try_s": self.delay_s})
            self.schedule()
            return
        log.info("primary loaded again", extra={"artifact": str(self.artifact), "tries": self.tries})


def stand_in_reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, EdgemlError) else f"{type(exc).__name__}: {exc}"


def check_compatible(primary: "LoadedModel", fallback: "LoadedModel") -> None:
    """A fallback must take the same inputs and give the same outputs (names, dtypes, shapes)."""
    def sig(lm: "LoadedModel") -> tuple:
        return (sorted((s.name, s.dtype, s.shape) for s in lm.input_specs.values()),
                sorted((s.name, s.dtype, s.shape) for s in lm.output_specs.values()))

    if sig(primary) != sig(fallback):
        raise ServeError(f"fallback {fallback.source} does not match {primary.source}: inputs/outputs "
                         f"{sig(fallback)} vs {sig(primary)}",
                         hint="a fallback must be another build of the same model (same tensors)")
