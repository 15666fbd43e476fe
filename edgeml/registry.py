"""One registry style for the whole project.

A registry maps a name to an implementation given as ``"module:attribute"`` so
that heavy packages (torch, openvino, tvm) are imported only when that entry is
used. Each registry is built from a list of ``(name, "module:attr")`` pairs in
one place; a duplicate name raises at import time.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Iterator

from edgeml.errors import RegistryError


class Registry:
    def __init__(self, kind: str, entries: Iterable[tuple[str, str]] = ()):
        self.kind = kind
        self._paths: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}
        for name, path in entries:
            self.register(name, path)

    def register(self, name: str, path_or_obj: Any) -> None:
        if name in self._paths:
            raise RegistryError(f"duplicate {self.kind} '{name}' in registry")
        if isinstance(path_or_obj, str):
            self._paths[name] = path_or_obj
        else:
            self._paths[name] = f"<object {path_or_obj!r}>"
            self._loaded[name] = path_or_obj

    def names(self) -> list[str]:
        return list(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def get(self, name: str) -> Any:
        if name not in self._paths:
            raise RegistryError(
                f"unknown {self.kind} '{name}'",
                hint=f"choose one of: {', '.join(sorted(self._paths))}",
            )
        if name not in self._loaded:
            module_name, _, attr = self._paths[name].partition(":")
            module = importlib.import_module(module_name)
            self._loaded[name] = getattr(module, attr)
        return self._loaded[name]
