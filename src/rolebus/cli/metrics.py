"""`rolebus metrics`: the status for Prometheus."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from rolebus.bus import Bus
from rolebus.cli.app import (
    RolesOption,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.history.status import serve_metrics
from rolebus.team.durations import parse_duration


def metrics_command(
    port: Annotated[int, typer.Option(help="Port for GET /metrics.")] = 9464,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    window: Annotated[str, typer.Option(help="Latency and error window.")] = "1h",
    roles: RolesOption = None,
) -> None:
    """Serve `rolebus status` as Prometheus metrics on http://HOST:PORT/metrics."""
    settings = settings_for(roles)
    team = team_for(settings)
    seconds = parse_duration(window)

    async def go() -> None:
        async with await Bus.connect(settings, name="rolebus-metrics") as bus:
            ready = asyncio.Event()
            server = asyncio.create_task(
                serve_metrics(
                    bus.connection, team, host=host, port=port, window=seconds, ready=ready
                )
            )
            await ready.wait()
            out.print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C to stop)")
            await server

    try:
        run(go())
    except KeyboardInterrupt:
        out.print("stopped.")
