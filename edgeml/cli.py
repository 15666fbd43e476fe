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
        ("doctor", "edgeml.doctor:doctor_cmd"),
    ],
)


class LazyGroup(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Click's own usage errors in edgeml's format: ``error: ...`` + ``hint:`` (JSON with --json), exit 2."""
        if os.environ.get("NO_COLOR"):
            extra.setdefault("color", False)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            if "default_map" not in extra:       # option defaults from the config file (edgeml/config.py)
                from edgeml.config import load_defaults

                extra["default_map"] = load_defaults(self)
        except EdgemlError as exc:
            _fail(exc, "--json" in argv)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:     # `edgeml`, `edgeml fleet`: the help, not an error
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(0)
        except click.exceptions.UsageError as exc:
            names: list[str] = []
            ctx = exc.ctx
            while ctx is not None and ctx.parent is not None:     # the root's name may be "python -m edgeml.cli"
                names.insert(0, ctx.info_name or "")
                ctx = ctx.parent
            command = " ".join(["edgeml", *names])
            message = exc.format_message()
            if isinstance(exc, click.BadParameter) and exc.param is not None and exc.param_hint is None:
                opts = [o for o in getattr(exc.param, "opts", []) if o not in getattr(exc.param, "hidden_aliases", ())]
                message = f"{opts[0] if opts else exc.param.human_readable_name}: {exc.message}"
            _fail(UsageError(message, hint=f"see '{command} --help'"), "--json" in argv)
        except click.exceptions.ClickException as exc:
            _fail(EdgemlError(exc.format_message()), "--json" in argv, exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

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


def _fail(err: EdgemlError, as_json: bool, code: int | None = None) -> None:
    if as_json:
        click.echo(json.dumps(err.to_dict(), indent=2))
    else:
        click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code if code is None else code)


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
    if exc.filename is None:     # not a path: a socket, a process, a limit
        return f"the operating system refused: {exc.strerror or exc}"
    return f"cannot access {exc.filename}: {exc.strerror or exc}"


def check_trusted_keys(paths: "tuple[Path, ...] | list[Path]") -> None:
    """Read every --trusted-key before any work: a missing or malformed key is the same error (exit 7) in every
    command, not a confusing 'unsigned' later."""
    if not paths:
        return
    from edgeml.runtime.signing import load_public_key

    for key in paths:
        load_public_key(Path(key))


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


LOG_LEVELS = ("debug", "info", "warning", "error")
_log_level = click.option(
    "--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info", show_default=True,
    envvar="EDGEML_LOG_LEVEL", show_envvar=True,
    help="Least severe log records shown on stderr (edgeml -v / -q set it for every command).")
_log_format = click.option(
    "--log-format", type=click.Choice(("text", "json"), case_sensitive=False), default="text", show_default=True,
    envvar="EDGEML_LOG_FORMAT", show_envvar=True,
    help="text: 'HH:MM:SS level message key=value' (as edgeml serve); json: one object per line.")


def log_level_option(func: Callable) -> Callable:
    """--log-level and --log-format, the same on every long-running command."""
    return _log_level(_log_format(func))


def port_in_use(exc: BaseException, option: str, port: int) -> "UsageError | None":
    """A bind failure (an OSError, or an error caused by one) as one line naming the option and port, exit 2 in
    every command (None: not a bind failure)."""
    import errno

    if not isinstance(exc, OSError):
        cause = exc.__cause__
        return port_in_use(cause, option, port) if isinstance(cause, OSError) else None
    if exc.errno == errno.EADDRINUSE:
        return UsageError(f"{option} {port}: the port is already in use (another edgeml process, or another program)",
                          hint=f"choose another {option} (0 picks a free one) or stop the process listening there")
    if exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL):
        return UsageError(f"{option} {port}: cannot listen there ({exc.strerror})",
                          hint="ports below 1024 need root; the address must belong to this host")
    return None


def complete_target(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of target names (the TOML files in targets/: no heavy import)."""
    from click.shell_completion import CompletionItem

    from edgeml.targets import all_targets

    return [CompletionItem(t.name, help=t.description) for t in all_targets().values() if t.name.startswith(incomplete)]


def examples(*lines: str) -> str:
    """An ``Examples:`` epilog for a command's --help, kept verbatim (click's \\b: no re-wrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


class AliasedOption(click.Option):
    """An option whose old spellings still work but are left out of --help (``hidden_aliases``)."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        saved = self.opts
        self.opts = [o for o in saved if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


class PortType(click.ParamType):
    """A TCP port: 0-65535 (0 picks a free one), -1 too where ``off`` names what it turns off. One message."""

    name = "PORT"

    def __init__(self, off: str | None = None):
        self.off = off

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        low = -1 if self.off else 0
        try:
            port = int(value)
        except (TypeError, ValueError):
            port = None
        if port is None or not low <= port <= 65535:
            self.fail(f"{value} is not a port: give 1-65535, or 0 to pick a free one"
                      + (f" (-1: {self.off})" if self.off else ""), param, ctx)
        return port


class DurationType(click.ParamType):
    """One duration syntax for every option: 250ms, 10s, 5m, 1h; a bare number is in the option's own unit
    (``unit``: "ms" or "s", what its name ends in), so old command lines keep working. Returns that unit."""

    name = "DURATION"
    UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

    def __init__(self, unit: str = "s"):
        self.unit = unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        text = str(value).strip().lower()
        for suffix in ("ms", "s", "m", "h"):
            if text.endswith(suffix):
                try:
                    return float(text[: -len(suffix)]) * self.UNITS[suffix] / self.UNITS[self.unit]
                except ValueError:
                    break
        try:
            return float(text)
        except ValueError:
            self.fail(f"{value} is not a duration: write e.g. 250ms, 10s, 5m or 1h (a bare number is {self.unit})",
                      param, ctx)


def port_option(*names: str, default: int | None, help: str, off: str | None = None,
                hidden_aliases: tuple[str, ...] = (), dest: str | None = None) -> Callable:
    """The one port option: ``--port`` (old spellings kept as hidden aliases), range-checked by PortType."""
    decls = [*names, *hidden_aliases] + ([dest] if dest else [])
    return click.option(*decls, cls=AliasedOption, hidden_aliases=hidden_aliases, type=PortType(off),
                        default=default, show_default=default is not None, help=help)


EXIT_CODES = (
    (0, "success"),
    (1, "unexpected failure (a bug: please report it), or a batch job with failed items"),
    (2, "usage: a bad option or argument value, a port out of range or taken, an unknown target"),
    (3, "an optional package is missing (the message names the pip extra)"),
    (4, "this host lacks the CPU features the target or artifact needs"),
    (5, "the model or a data file is missing, unreadable or does not fit the model"),
    (6, "compile: no candidate could be built or kept the accuracy"),
    (7, "artifact: missing, a folder, an .onnx instead, truncated, tampered or badly signed"),
    (8, "a backend failed to load or run the model"),
    (9, "the model server could not start or serve"),
    (10, "fleet: broker unreachable, rollout rolled back/aborted/timed out, unknown artifact or device"),
    (130, "interrupted (Ctrl-C)"),
)
ENV_VARS = (
    ("EDGEML_BROKER", "MQTT broker URL of agent, manager and fleet commands (--broker)"),
    ("EDGEML_FLEET_DB", "the manager's database, SQLite file or postgresql:// URL (--db)"),
    ("EDGEML_DEVICE_ID", "the agent's device id (--device-id)"),
    ("EDGEML_TRUSTED_KEYS", "public keys (path-separated list) artifacts must be signed with"),
    ("EDGEML_ADMIN_TOKEN", "bearer token of the model server's repository API (--admin-token)"),
    ("EDGEML_LOG_LEVEL", "debug|info|warning|error for every command (--log-level; -v/-q set it)"),
    ("EDGEML_LOG_FORMAT", "text|json logs of agent and manager (--log-format)"),
    ("EDGEML_CONFIG", "option defaults file (default ~/.config/edgeml/config.toml: [agent] broker = ...)"),
    ("NO_COLOR", "set: no colour in any output"),
)


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES)
    env = "\n".join(f"  {name:<20} {what}" for name, what in ENV_VARS)
    return ("\b\nStart here: README.md 'Try it in five minutes', docs/quickstart-fleet.md.\n\n"
            f"\b\nExit codes (the same code for the same mistake in every command):\n{codes}\n\n"
            f"\b\nEnvironment:\n{env}\n\n"
            "\b\nShell completion (bash; zsh/fish: replace bash_source):\n"
            '  eval "$(_EDGEML_COMPLETE=bash_source edgeml)"')


def _version_text() -> str:
    """edgeml's version and every backend's, installed or not (importlib.metadata: no heavy import)."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    import platform

    rows = [("edgeml", version("edgeml")), ("python", platform.python_version()),
            ("onnxruntime", version("onnxruntime")), ("openvino", version("openvino")),
            ("apache-tvm", version("apache-tvm")), ("torch", version("torch")), ("paho-mqtt", version("paho-mqtt"))]
    return "\n".join(f"{name:<12} {v}" for name, v in rows)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(_version_text())
    ctx.exit(0)


def _verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value and not ctx.resilient_parsing:
        os.environ["EDGEML_LOG_LEVEL"] = {"verbose": "debug", "quiet": "warning"}[param.name or "verbose"]
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show edgeml's version and its backends' versions, then exit.")
@click.option("-v", "--verbose", count=True, expose_value=False, callback=_verbosity,
              help="Debug logs in every command (sets $EDGEML_LOG_LEVEL=debug).")
@click.option("-q", "--quiet", count=True, expose_value=False, callback=_verbosity,
              help="Only warnings and errors in the logs (sets $EDGEML_LOG_LEVEL=warning).")
def main() -> None:
    """edgeml: compile models into verified artifacts, serve them, roll them out."""


if __name__ == "__main__":  # pragma: no cover
    main()
