"""The null backend raises only edgeml errors; its table is empty (everything else is a BackendError)."""

from __future__ import annotations

from edgeml.backends.errors import ErrorTable

TABLE = ErrorTable("null", [], display="null backend")
