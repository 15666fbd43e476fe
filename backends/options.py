"""Typed backend options: each backend declares a frozen dataclass; user values are checked against it.

A field's annotation says what it accepts (``int``, ``float``, ``bool``, ``str``,
``list[str]``, ``dict``, optionally ``| None``); ``metadata`` may add ``choices``
(allowed strings), ``check`` (a function that validates and normalizes the
value, raising ``UsageError``) and ``help``. Values from the command line arrive
as strings (``--option ov_subset_size=64``) and are converted here, so a
backend's builder reads plain typed attributes and never guesses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping, Union

from edgeml.errors import UsageError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,  # noqa: A002 - mirrors argparse
           check: Any = None) -> Any:
    """A dataclass field for a backend option (immutable defaults only)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check})


def option_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def option_help(schema: type) -> dict[str, str]:
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(schema)}


def parse_options(schema: type, values: Mapping[str, Any], backend: str) -> Any:
    """Build ``schema`` from the given values (unknown keys are the caller's concern)."""
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        value = _coerce(f.name, values[f.name], hints[f.name], backend)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UsageError(f"{backend} option {f.name}={value!r} is not one of {list(choices)}",
                             hint=f"{f.name}: {f.metadata.get('help', '')}")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            value = check(value)
        kwargs[f.name] = value
    return schema(**kwargs)


def unknown_option_error(key: str, valid: list[str], what: str = "compile option") -> UsageError:
    """UsageError naming the valid names, with a "did you mean" when one is close."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"unknown {what} {key!r}{guess}", hint=f"valid names: {', '.join(sorted(valid))}")


def _coerce(name: str, value: Any, annotation: Any, backend: str) -> Any:
    allowed = _members(annotation)
    if value is None:
        if type(None) in allowed:
            return None
        raise UsageError(f"{backend} option {name} cannot be empty")
    errors = []
    for kind in allowed:
        if kind is type(None):
            continue
        try:
            return _as(kind, value)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    want = " or ".join(_name(k) for k in allowed if k is not type(None))
    raise UsageError(f"{backend} option {name}={value!r} is not {want}")


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)


def _as(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError("not a boolean")
    if origin is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError("not an integer")
        return int(value)
    if origin is float:
        if isinstance(value, bool):
            raise TypeError("not a number")
        return float(value)
    if origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("not a string")
    if origin in (list, tuple):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise TypeError("not a list of strings")
        return tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TypeError("not a table")
        return dict(value)
    raise TypeError(f"unsupported option type {kind}")
