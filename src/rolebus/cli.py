"""The ``rolebus`` command. The only place logging is configured.

Every command turns a :class:`~rolebus.errors.RolebusError` into one clear
message on stderr and exit code 1 (2 for bad usage); never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar, cast

import structlog
import typer
from rich.console import Console
from rich.table import Table

from rolebus import subjects as names
from rolebus.auth import ADMIN, Credentials, render_config
from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import ConfigError, RolebusError
from rolebus.roles import RoleSpec, Team, load_team
from rolebus.runner import provision_team, start_workers, stop_on_signals
from rolebus.server import DEFAULT_PORT, port_is_free, running_server_url, serve

__all__ = ["app", "main"]

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
roles_app = typer.Typer(help="The team: list the roles, or check the role files.")
app.add_typer(roles_app, name="roles")

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
    _CONNECTION.update(creds_file=creds, user=user, nkey_seed_file=nkey)


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


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str)) if sys.stdout.isatty() else print(
        json.dumps(value, default=str)
    )


# --- server ------------------------------------------------------------------------------


@app.command()
def server(
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default 4222 or ROLEBUS_PORT; 0: any).")
    ] = None,
) -> None:
    """Run the embedded NATS server (JetStream, fsync always) until Ctrl-C.

    Its store lives in the state folder (`.rolebus/`, or ROLEBUS_HOME); every other
    command in this folder finds it by itself.
    """
    settings = settings_for(port=port)
    if settings.nats_url:
        err.print(
            f"[yellow]note:[/] NATS_URL={settings.nats_url} is set, so other commands "
            "will use that server, not this one."
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with serve(home=settings.home, port=settings.port, sync_interval=settings.sync_interval) as s:
        run(_provision(settings.with_overrides(nats_url=s.url)))
        out.print(f"rolebus server listening on [bold]{s.url}[/]")
        out.print(
            f"  JetStream store: {s.store_dir}  (sync_interval: {settings.sync_interval})\n"
            f"  log: {s.log_path}\n  Stop with Ctrl-C."
        )
        while not stop.wait(0.5):
            if not s.running:
                raise RolebusError(
                    "nats-server stopped unexpectedly", hint=f"see its log in {s.log_path}"
                )
    out.print("rolebus server stopped.")


async def _provision(settings: Settings) -> None:
    bus = await Bus.connect(settings, name="rolebus-provision")
    await bus.close()


@app.command()
def provision(roles: RolesOption = None) -> None:
    """Create the streams, KV buckets and every role's consumer (idempotent; reports
    incompatible ones). Run it as the admin user when roles use `rolebus auth`."""
    settings = settings_for(roles)
    team = team_for(settings)

    async def go() -> None:
        async with await Bus.connect(settings, name="rolebus-provision") as bus:
            await provision_team(bus, team)

    run(go())
    out.print(
        "ready: streams "
        + ", ".join(s.name for s in names.STREAMS)
        + f"; consumers for {', '.join(role.id for role in team)} and the supervisor"
    )


@app.command("auth")
def auth_command(
    secrets: Annotated[
        Path, typer.Option(help="Folder for the users' password files (created, 0600).")
    ] = Path(".rolebus/secrets"),
    roles: RolesOption = None,
) -> None:
    """Print a nats-server authorization config for the team (least privilege).

    `rolebus auth > nats-auth.conf`, then `include nats-auth.conf` in the server
    config. Workers connect as their role: `rolebus --user eng-be --password-file
    .rolebus/secrets/eng-be.password worker eng-be`.
    """
    team = team_for(settings_for(roles))
    credentials = Credentials.load_or_create(secrets, [ADMIN, *(role.id for role in team)])
    sys.stdout.write(render_config(team, credentials))


# --- the team ----------------------------------------------------------------------------


def _role_row(role: Any) -> dict[str, Any]:
    handler = role.handler if isinstance(role.handler, str) else " ".join(role.handler.command)
    return {
        "id": role.id,
        "title": role.title,
        "reports_to": role.reports_to,
        "domains": role.domains,
        "handler": handler,
        "concurrency": role.concurrency,
        "never": [rule.what for rule in role.never],
        "file": role.source,
    }


@roles_app.callback(invoke_without_command=True)
def roles_list(ctx: typer.Context, roles: RolesOption = None, as_json: JsonOption = False) -> None:
    """List the team (id, title, who they report to, domains, handler)."""
    if ctx.invoked_subcommand is not None:
        return
    team = team_for(settings_for(roles))
    rows = [_role_row(role) for role in team]
    if as_json:
        print_json(rows)
        return
    table = Table("id", "title", "reports to", "domains", "handler", "never", title="the team")
    for row in rows:
        table.add_row(
            row["id"],
            row["title"],
            row["reports_to"] or "(top)",
            ", ".join(row["domains"]),
            row["handler"],
            "\n".join(row["never"]),
        )
    out.print(table)


@roles_app.command("check")
def roles_check(roles: RolesOption = None) -> None:
    """Validate every role file and the team as a whole; exit 1 naming the problem."""
    settings = settings_for(roles)
    team = team_for(settings)
    out.print(
        f"{len(team)} roles OK in {settings.roles_dir}: " + ", ".join(role.id for role in team)
    )


# --- workers -----------------------------------------------------------------------------


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


async def _run_until_stopped(
    settings: Settings, team: Team, roles: list[RoleSpec], *, replicas: int, grace: float
) -> None:
    stop = asyncio.Event()
    restore = stop_on_signals(stop)
    try:
        crew = await start_workers(settings, team, roles, replicas=replicas, grace=grace)
        table = Table(
            "role", "title", "consumer", "concurrency", "replicas", "reads", title="roles up"
        )
        for role in roles:
            table.add_row(
                role.id,
                role.title,
                names.consumer_name(role.id),
                str(role.concurrency),
                str(replicas),
                ", ".join(role.filter_subjects),
            )
        out.print(table)
        out.print(
            "Stop with Ctrl-C (running handlers get "
            f"{grace:g}s to finish, the rest is redelivered)."
        )
        # Everything loaded so far (modules, pydantic schemas, the team) lives as
        # long as the process: keep it out of the collector's full passes, which
        # otherwise stop a busy worker ~20 ms each (p99 at 1,000 tasks/s: 40 -> 15 ms).
        gc.freeze()
        await stop.wait()
        out.print("stopping...")
        await crew.stop()
    finally:
        await restore()
    out.print("stopped.")


GraceOption = Annotated[
    float, typer.Option(help="Seconds running handlers get to finish on Ctrl-C/SIGTERM.")
]


@app.command()
def worker(
    role: Annotated[str, typer.Argument(help="The role id, e.g. eng-be.")],
    replicas: Annotated[int, typer.Option(min=1, help="Workers in this process.")] = 1,
    grace: GraceOption = 30.0,
    roles: RolesOption = None,
) -> None:
    """Run one role's worker until Ctrl-C/SIGTERM.

    Several `rolebus worker ROLE` processes (or --replicas) share the role's durable
    consumer: the work is split and nothing is handled twice.
    """
    settings = settings_for(roles)
    team = team_for(settings)
    spec = team.role(role)
    run(_run_until_stopped(settings, team, [spec], replicas=replicas, grace=grace))


@app.command()
def up(
    grace: GraceOption = 30.0,
    roles: RolesOption = None,
) -> None:
    """Run the whole team (every role in roles/) until Ctrl-C.

    Without NATS_URL and without a running `rolebus server`, starts the embedded
    server too.
    """
    settings = settings_for(roles)
    team = team_for(settings)
    with embedded_server_if_needed(settings) as live:
        run(_run_until_stopped(live, team, list(team), replicas=1, grace=grace))


# --- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning rolebus errors into clean exits."""
    # Command groups in their own modules register themselves on `app`, in this
    # order in `--help`: publishing first, right after running.
    for group in ("cli_publish", "cli_flow", "cli_history", "cli_watch", "cli_dlq"):
        importlib.import_module(f"rolebus.{group}")

    _run_app(app, argv)


def _run_app(application: Callable[..., Any], argv: list[str] | None) -> None:
    try:
        application(args=argv, standalone_mode=True)
    except RolebusError as error:
        err.print(f"[bold red]error:[/] {error.message}", highlight=False)
        if error.hint:
            err.print(f"  [dim]hint:[/] {error.hint}", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
