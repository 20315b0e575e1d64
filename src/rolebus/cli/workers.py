"""`rolebus worker ROLE` and `rolebus up`: run role workers until stopped."""

from __future__ import annotations

import asyncio
import gc
from typing import Annotated

import typer
from rich.table import Table

from rolebus.cli.app import (
    RolesOption,
    embedded_server_if_needed,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire import subjects as names
from rolebus.worker.runner import start_workers, stop_on_signals


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
