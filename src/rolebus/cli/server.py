"""`rolebus server` and `rolebus provision`: the embedded server, and what it must hold."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from rolebus.bus import Bus
from rolebus.cli.app import (
    RolesOption,
    err,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import RolebusError
from rolebus.nats.server import serve
from rolebus.wire import subjects as names
from rolebus.worker.runner import provision_team


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
