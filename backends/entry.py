"""``Backend``: the one registry entry that describes a backend to the compiler, the runtime and the CLI."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

from edgeml.backends.options import option_names, parse_options, unknown_option_error


def _load(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class Backend:
    """One backend: where its parts live (imported only when used) and what it accepts.

    ``build`` / ``run`` / ``errors`` are ``"module:attribute"`` paths, so a device that
    only runs artifacts never imports the build side (onnx, openvino's converter, TVM's
    compiler, nncf, torch).
    """

    name: str
    summary: str
    options: type                    # frozen dataclass: the typed options schema (edgeml.backends.options)
    build: str                       # CompilerBackend subclass
    run: str                         # RuntimeBackend subclass
    errors: str                      # ErrorTable
    auto: bool = True                # tried by ``--backend auto`` when the target lists it
    any_target: bool = False         # usable for every target when asked for by name (test doubles)
    # True when the built members are run by a library that picks its kernels for the CPU it runs on
    # (ONNX Runtime, OpenVINO): such a candidate may be run, as an indication, on a host that lacks some
    # of the target's features. False (TVM's native code): it is never executed on such a host.
    portable_code: bool = False

    def compiler(self) -> Any:
        """A new CompilerBackend instance."""
        return _load(self.build)()

    def runtime_class(self) -> Any:
        return _load(self.run)

    def error_table(self) -> Any:
        return _load(self.errors)

    def option_names(self) -> list[str]:
        return option_names(self.options)

    def parse_options(self, values: Mapping[str, Any], *, strict: bool = False) -> Any:
        """This backend's typed options from ``values``.

        Keys of other backends are ignored, unless ``strict`` (a dict handed straight
        to this backend's builder), where any unknown key is refused with the valid names.
        """
        if strict:
            valid = self.option_names()
            for key in values:
                if key not in valid:
                    raise unknown_option_error(key, valid, f"{self.name} option")
        return parse_options(self.options, values, self.name)
