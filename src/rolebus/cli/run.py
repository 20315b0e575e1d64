"""Running the bus: the server, provisioning, credentials, role files, workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    app,
    embedded_server_if_needed,
    err,
    out,
    print_json,
    roles_app,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import ConfigError, RolebusError
from rolebus.handlers.loader import check_team_handlers
from rolebus.nats.server import serve
from rolebus.team.auth import ADMIN, Credentials, render_config
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire import subjects as names
from rolebus.worker.runner import provision_team, start_workers, stop_on_signals


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
        Path,
        typer.Option(help="Folder for the users' password or nkey seed files (created, 0600)."),
    ] = Path(".rolebus/secrets"),
    nkeys: Annotated[
        bool,
        typer.Option(
            "--nkeys",
            help="Users by nkey instead of password (recommended): each role's seed is "
            "SECRETS/<role>.nk and the config holds only public keys.",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the config as nats-auth.conf in this folder (mode 0600), "
            "instead of to stdout.",
        ),
    ] = None,
    roles: RolesOption = None,
) -> None:
    """Write a nats-server authorization config for the team (least privilege).

    `rolebus auth --nkeys --output deploy/`, then `include nats-auth.conf` in the
    server config. Workers connect as their role: `rolebus --nkey
    .rolebus/secrets/eng-be.nk worker eng-be` (other commands: add `--as eng-be`).
    Without --nkeys the users have passwords (`rolebus --user eng-be --password-file
    .rolebus/secrets/eng-be.password worker eng-be`); that config holds them, so it
    is never printed to a terminal, and a file it goes into is made readable by its
    owner only (`> file` too).
    """
    team = team_for(settings_for(roles))
    users = [ADMIN, *(role.id for role in team)]
    if nkeys:
        credentials = Credentials.load_or_create(secrets, users, nkeys=True)
        config = render_config(team, credentials)
        if output is None:
            sys.stdout.write(config)  # public keys only: safe anywhere
            return
        output.mkdir(parents=True, exist_ok=True)
        (output / "nats-auth.conf").write_text(config, encoding="utf-8")
        err.print(
            f"wrote {output / 'nats-auth.conf'} (public keys only); each user's seed is "
            f"{secrets}/<user>.nk (mode 0600): rolebus --nkey {secrets}/eng-be.nk worker eng-be",
            highlight=False,
        )
        return
    if output is None and sys.stdout.isatty():
        raise ConfigError(
            "the config holds the users' passwords: it is not printed to a terminal",
            hint="rolebus auth --output DIR (writes DIR/nats-auth.conf, mode 0600), "
            "or redirect it: rolebus auth > nats-auth.conf",
        )
    credentials = Credentials.load_or_create(secrets, users)
    config = render_config(team, credentials)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        path = output / "nats-auth.conf"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(config)
        err.print(f"wrote {path} (mode 0600); the passwords are in {secrets}")
        return
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            os.fchmod(sys.stdout.fileno(), 0o600)  # `> file`: not readable by others
    sys.stdout.write(config)


# --- the team ----------------------------------------------------------------------------


def _handler_label(role: RoleSpec) -> str:
    handler = role.handler
    if isinstance(handler, str):
        return handler
    if isinstance(handler, LlmHandler):
        return f"llm:{handler.llm}" + (f" at {handler.base_url}" if handler.base_url else "")
    return " ".join(handler.command)


def _role_row(role: RoleSpec) -> dict[str, Any]:
    handler = _handler_label(role)
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
    check_team_handlers(team)
    out.print(
        f"{len(team)} roles OK in {settings.roles_dir}: " + ", ".join(role.id for role in team)
    )


# --- workers -----------------------------------------------------------------------------


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
        # otherwise stop a busy worker for milliseconds each (its p99 latency shows
        # it; bench/README has the figures).
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
