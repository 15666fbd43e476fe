"""The ``edgeml`` command: a thin click layer over the Python API.

Each area owns its commands in its own ``cli.py`` and is attached lazily here by
one line in COMMANDS, so ``edgeml --help`` imports no heavy package.
Every command takes ``--json``; errors print their message (never a traceback)
and exit with the error's ``exit_code`` (see edgeml/errors.py).
"""

from __future__ import annotations

import importlib
import json
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from edgeml.errors import EdgemlError
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
            @click.command(name, help=f"(unavailable: {exc})")
            def unavailable() -> None:
                raise click.ClickException(f"command '{name}' is unavailable here: {exc}")

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

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeml")
def main() -> None:
    """edgeml: compile models into verified artifacts, serve them, roll them out."""


if __name__ == "__main__":  # pragma: no cover
    main()
