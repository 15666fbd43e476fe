"""Each backend's one table from third-party exceptions to edgeml errors.

A backend library raises its own (often unexported) exception types whose
meaning is in the message. A backend's ``errors.py`` lists ``ErrorRule`` s in
order; the first whose ``pattern`` matches the message (and whose ``types``, if
given, include the exception's class name) decides the edgeml error. Everything
else becomes the table's fallback (``BackendError``). The builder, the runtime
and the pipeline's FP32 reference all map through the same table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from edgeml.errors import BackendError, EdgemlError


@dataclass(frozen=True)
class ErrorRule:
    pattern: str                     # regular expression searched in str(exc)
    error: type[EdgemlError]
    message: str                     # str.format with {what}, {text}, {version} and the pattern's named groups
    hint: str | None = None
    types: tuple[str, ...] = ()      # exception class names this rule is limited to (empty: any)


class ErrorTable:
    def __init__(self, backend: str, rules: list[ErrorRule], version: Callable[[], str] = lambda: "",
                 fallback: type[EdgemlError] = BackendError, display: str | None = None):
        self.backend = backend
        self.display = display or backend
        self.rules = [(re.compile(r.pattern), r) for r in rules]
        self.version = version
        self.fallback = fallback

    def map(self, exc: BaseException, what: str) -> EdgemlError:
        """The edgeml error for ``exc``, raised while the backend tried to ``what`` ("load the model")."""
        if isinstance(exc, EdgemlError):
            return exc
        text = str(exc).strip() or type(exc).__name__
        for pattern, rule in self.rules:
            if rule.types and type(exc).__name__ not in rule.types:
                continue
            m = pattern.search(text)
            if m is None:
                continue
            groups = {k: (v if v is not None else "") for k, v in m.groupdict().items()}
            fields = {"what": what, "text": text[:300], "version": self._version(), "backend": self.backend, **groups}
            return rule.error(rule.message.format(**fields), hint=rule.hint)
        return self.fallback(f"{self.display} cannot {what}: {text[:500]}")

    def _version(self) -> str:
        try:
            return self.version()
        except Exception:  # the version is decoration in a message; never hide the real error
            return "?"
