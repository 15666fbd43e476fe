"""Option defaults from a config file: ``$EDGEML_CONFIG``, else ``$XDG_CONFIG_HOME/edgeml/config.toml``
(``~/.config/edgeml/config.toml``). One TOML table per command, keys are option names::

    [agent]
    broker = "mqtt://10.0.0.5:1883"
    labels = "site=lab"
    state-dir = "/var/lib/edgeml"

    [fleet.manager]
    db = "/var/lib/edgeml/fleet.db"
    port = 8765

    [compile]
    target = "x86_64-avx2"

The command line wins, then an option's environment variable, then this file, then the built-in default.
A table or key that names no command or option is refused (exit 2) naming the file, so a typo never silently
does nothing.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

import click

from edgeml.errors import UsageError


def config_path() -> Path | None:
    """The config file in use, or None when there is none."""
    explicit = os.environ.get("EDGEML_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "edgeml" / "config.toml"
    return path if path.is_file() else None


def load_defaults(root: click.Group) -> dict[str, Any] | None:
    """click's ``default_map`` for ``root`` from the config file (None: no file)."""
    path = config_path()
    if path is None:
        return None
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} ($EDGEML_CONFIG) does not exist",
                         hint="fix $EDGEML_CONFIG or unset it") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}", hint="fix or remove it") from None
    return _map(root, data, path, [])


def _map(cmd: click.Command, table: dict[str, Any], path: Path, where: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ctx = click.Context(cmd)
    for key, value in table.items():
        if isinstance(value, dict):
            sub = cmd.get_command(ctx, key) if isinstance(cmd, click.Group) else None
            if sub is None:
                names = cmd.list_commands(ctx) if isinstance(cmd, click.Group) else []
                raise _unknown(path, "command", " ".join(["edgeml", *where, key]), key, names)
            out[key] = _map(sub, value, path, [*where, key])
            continue
        params = {o.lstrip("-"): p.name for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--")}
        params.update({p.name: p.name for p in cmd.params if p.name and isinstance(p, click.Option)})
        name = params.get(key) or params.get(key.replace("_", "-"))
        if name is None:
            raise _unknown(path, "option", f"[{'.'.join(where) or 'edgeml'}] {key}", key, sorted(params))
        if name == "db" and os.environ.get("EDGEML_FLEET_DB"):
            continue        # --db reads its variable itself (fleet/cli.py _db_path): the variable still wins
        out[name] = value
    return out


def _unknown(path: Path, what: str, full: str, key: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known[:12])}"
    return UsageError(f"config file {path}: {full} is not an edgeml {what}", hint=hint)
