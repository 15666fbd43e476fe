"""Compatibility: the runtime side of every backend now lives in edgeml.backends.<name>.run.

``open_backend`` and ``RuntimeBackend`` are re-exported here for existing callers
(edgeml.runtime.model); new code imports them from edgeml.backends.
"""

from __future__ import annotations

from edgeml.backends import open_backend
from edgeml.backends.base import RuntimeBackend

__all__ = ["RuntimeBackend", "open_backend"]
