"""The ``rolebus`` command. The only place logging is configured.

Every command turns a :class:`~rolebus.errors.RolebusError` into one clear
message on stderr and exit code 1 (2 for bad usage); never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar, cast

import structlog
import typer
from rich.console import Console
from rich.table import Table

from rolebus.config import Settings
from rolebus.errors import ConfigError, RolebusError
from rolebus.nats.server import DEFAULT_PORT, port_is_free, running_server_url, serve
from rolebus.team.roles import Team, load_team

__all__ = ["app", "run_app"]

T = TypeVar("T")

app = typer.Typer(
    name="rolebus",
    help="An event-driven task bus for teams of role agents, on NATS JetStream.\n\n"
    "Start a server with `rolebus server` (or set NATS_URL), publish tasks with "
    "`rolebus publish`, run the team with `rolebus up`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RolesOption = Annotated[
    Path | None,
    typer.Option("--roles", help="Folder of role files (default: roles/ or ROLEBUS_ROLES)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


#: Connection options given before the command (they win over the environment).
_CONNECTION: dict[str, Any] = {}


@app.callback()
def _configure(
    creds: Annotated[
        Path | None, typer.Option("--creds", help="NATS credentials file (or NATS_CREDS).")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="NATS user (or NATS_USER).")] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="File holding the user's password (NATS_PASSWORD)."),
    ] = None,
    nkey: Annotated[
        Path | None, typer.Option("--nkey", help="nkey seed file (or NATS_NKEY).")
    ] = None,
    acting_as: Annotated[
        str | None,
        typer.Option(
            "--as",
            metavar="ROLE",
            help="The role whose nkey or creds these are (or ROLEBUS_AS): its inbox, no "
            "provisioning. `worker ROLE` knows it.",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "warning",
    log_format: Annotated[
        str, typer.Option("--log-format", help="console (readable) or json (one object a line).")
    ] = "console",
) -> None:
    configure_logging(level=log_level, fmt=log_format)
    _CONNECTION.clear()
    if password_file is not None:
        try:
            _CONNECTION["password"] = password_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read --password-file {password_file}: {error}") from error
    _CONNECTION.update(creds_file=creds, user=user, nkey_seed_file=nkey, acting_as=acting_as)


def configure_logging(*, level: str = "warning", fmt: str = "console") -> None:
    """structlog to stderr: readable by default, JSON lines with ``fmt="json"``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}: use debug, info, warning, error")
    if fmt not in ("console", "json"):
        raise typer.BadParameter(f"unknown log format {fmt!r}: use console or json")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now: loggers are cached on first use and
    must not keep a stream that was replaced (and closed) since."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def settings_for(roles: Path | None = None, **overrides: Any) -> Settings:
    return Settings.from_env(roles_dir=roles, **_CONNECTION, **overrides)


def team_for(settings: Settings) -> Team:
    return load_team(settings.roles_dir)


def team_if_any(settings: Settings) -> Team | None:
    """The team, for a command that reads without one too (its roles folder may be
    absent where only the bus is)."""
    return load_team(settings.roles_dir) if settings.roles_dir.is_dir() else None


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def keep_whole(table: Table, *columns: int) -> Table:
    """Never cut these columns (ids a person copies into the next command): each is
    as wide as its longest cell, and the other columns give way."""
    for index in columns:
        column = table.columns[index]
        widest = max((len(str(cell)) for cell in column.cells), default=0)
        column.no_wrap = True
        column.min_width = max(widest, len(str(column.header)))
    return table


def print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str)) if sys.stdout.isatty() else print(
        json.dumps(value, default=str)
    )


@contextlib.contextmanager
def embedded_server_if_needed(settings: Settings) -> Iterator[Settings]:
    """With no NATS_URL and no running `rolebus server`, run the embedded one."""
    if settings.nats_url or running_server_url(settings.home):
        yield settings
        return
    port = settings.port
    if port == DEFAULT_PORT and not port_is_free("127.0.0.1", port):
        # Another server (another project's?) has the default port: any free one
        # will do for a server that lives as long as this command.
        out.print(f"[dim]port {port} is taken; the embedded server takes a free one[/]")
        port = 0
    with serve(home=settings.home, port=port, sync_interval=settings.sync_interval) as s:
        out.print(f"embedded nats-server on [bold]{s.url}[/] (store {s.store_dir})")
        yield settings.with_overrides(nats_url=s.url)


def run_app(application: Callable[..., Any], argv: list[str] | None) -> None:
    try:
        application(args=argv, standalone_mode=True)
    except RolebusError as error:
        err.print(f"[bold red]error:[/] {error.message}", highlight=False)
        if error.hint:
            err.print(f"  [dim]hint:[/] {error.hint}", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
