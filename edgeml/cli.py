"""The ``edgeml`` command: a thin click layer over the Python API.

Each area owns its commands in its own ``cli.py`` and is attached lazily here by
one line in COMMANDS, so ``edgeml --help`` imports no heavy package.
Every command takes ``--json``; errors print their message (never a traceback)
and exit with the error's ``exit_code`` (see edgeml/errors.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from edgeml.errors import EdgemlError, UsageError
from edgeml.registry import Registry

COMMANDS = Registry(
    "command",
    [
        ("targets", "edgeml.cli_core:targets_cmd"),
        ("keygen", "edgeml.cli_core:keygen_cmd"),
        ("inspect", "edgeml.cli_core:inspect_cmd"),
        ("run", "edgeml.cli_core:run_cmd"),
        ("compile", "edgeml.compiler.cli:compile_cmd"),
        ("serve", "edgeml.runtime.server.cli:serve_cmd"),
        ("agent", "edgeml.fleet.cli:agent_cmd"),
        ("fleet", "edgeml.fleet.cli:fleet_group"),
        ("bench", "edgeml.benchmarks.cli:bench_group"),
    ],
)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS.names())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            return COMMANDS.get(name)
        except (ImportError, AttributeError) as exc:
            # ``exc`` is unbound once the except block ends: keep its text, not the name.
            return _unavailable_command(name, f"{type(exc).__name__}: {exc}")


def _unavailable_command(name: str, reason: str) -> click.Command:
    """A stand-in that explains why ``name`` cannot run here (e.g. an optional package is missing)."""

    @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
    @click.argument("ignored", nargs=-1, type=click.UNPROCESSED)
    def unavailable(ignored: tuple[str, ...]) -> None:
        raise click.ClickException(
            f"command '{name}' is unavailable here: {reason}\n"
            f"  hint: install the extra it needs (pip install 'edgeml[all]') or check the installation")

    return unavailable


def emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    """Print a result: JSON for scripts, else the human rendering."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        click.echo(human(obj) if human else obj)


def handle_errors(func: Callable) -> Callable:
    """Turn EdgemlError into a clean message + exit code (JSON when --json)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgemlError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps(exc.to_dict(), indent=2))
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as exc:
            # The last net for file-system refusals the command did not foresee (disk full,
            # permission denied, read-only /proc entries): one line naming the path, no traceback.
            err = UsageError(f"{_os_error_text(exc)}", hint="check the path and its permissions")
            if kwargs.get("as_json"):
                click.echo(json.dumps(err.to_dict(), indent=2))
            else:
                click.echo(f"error: {err}", err=True)
            sys.exit(1)

    return wrapper


def _os_error_text(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename is not None else ""
    return f"cannot access{where}: {exc.strerror or exc}"


def check_output_file(path: str | Path, option: str, *, overwrite: bool = True) -> Path:
    """Refuse an output path that cannot take a new regular file, before any work is done.

    Checks, in order: a non-empty file name, an existing parent folder (never created
    silently), no folder/device/FIFO at the path, the existing file only when
    ``overwrite``, and that a temp file can be created beside it (the atomic write's
    temp + rename needs that; it is what refuses ``/proc/version``).
    """
    text = str(path)
    if not text.strip() or text.endswith(("/", os.sep)):
        raise UsageError(f"{option}: {text!r} is not a file path", hint="give a path ending in a file name")
    target = Path(text)
    folder = target.parent
    if not folder.exists():
        raise UsageError(f"{option}: folder {folder} does not exist", hint=f"create it first (mkdir -p {folder})")
    if not folder.is_dir():
        raise UsageError(f"{option}: {folder} is not a folder")
    if target.is_dir():
        raise UsageError(f"{option}: {target} is a folder", hint="give a file path inside it")
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise UsageError(f"{option}: {target} exists and is not a regular file", hint="choose another path")
        if not overwrite:
            raise UsageError(f"{option}: {target} already exists", hint="choose another path or pass --force")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise UsageError(f"{option}: cannot create files in folder {folder} ({exc.strerror or exc})",
                         hint="choose a writable folder") from None
    os.close(fd)
    os.unlink(probe)
    return target


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeml")
def main() -> None:
    """edgeml: compile models into verified artifacts, serve them, roll them out."""


if __name__ == "__main__":  # pragma: no cover
    main()
