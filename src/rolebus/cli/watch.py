"""Commands that watch the team now: ``status`` (each role against its slo),
``metrics`` (the same for Prometheus) and the web ``dashboard``."""

from __future__ import annotations

import asyncio
import secrets
import socket
from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    app,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import ConfigError
from rolebus.history.status import RoleStatus, collect, serve_metrics
from rolebus.team.durations import parse_duration


def _cell(check: dict[str, Any], unit: str = "") -> str:
    value, target, met = check["value"], check["target"], check["met"]
    if target is None:
        return "-" if value is None else f"{value:.4g}{unit}"
    shown = "no data" if value is None else f"{value:.4g}{unit}"
    mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[dim]?[/]"}[met]
    return f"{shown} / {target:g}{unit} {mark}"


@app.command("status")
def status_command(
    window: Annotated[str, typer.Option(help="Latency and error window (e.g. 15m, 1h).")] = "1h",
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per role: backlog, in flight, redeliveries, dead letters, open escalations,
    p50/p99 latency and error rate, each against the role's `slo` targets."""
    settings = settings_for(roles)
    team = team_for(settings)
    seconds = parse_duration(window)

    async def go() -> list[RoleStatus]:
        async with await Bus.connect(settings, name="rolebus-status") as bus:
            return await collect(bus.connection, team, window=seconds)

    statuses = run(go())
    if as_json:
        print_json([status.as_json() for status in statuses])
        return
    table = Table(
        "role",
        "backlog",
        "in flight",
        "redelivered",
        "dead",
        "escalations",
        "p50",
        "p99",
        "error rate",
        "model today",
        title=f"status (last {window})",
    )
    for status in statuses:
        table.add_row(
            status.role,
            str(status.backlog),
            str(status.in_flight),
            str(status.redelivered),
            str(status.dead_letters),
            str(status.open_escalations),
            _cell(status.slo["p50_latency_ms"], " ms"),
            _cell(status.slo["p99_latency_ms"], " ms"),
            _cell(status.slo["error_rate"]),
            _spent(status.usage.get("today", {})),
        )
    out.print(table)
    for status in statuses:
        if status.effects_pending:
            out.print(
                f"[yellow]{status.role}: {status.effects_pending} finished task(s) whose "
                "follow-ups are not stored yet[/] (retried; `rolebus tasks --role "
                f"{status.role}` lists them, the worker's log says why)"
            )


@app.command("metrics")
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


@app.command("dashboard")
def dashboard_command(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option(help="Required on every request; made up when --host is public.")
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Another host name it may be reached by (repeat it); loopback names and "
            "--host are allowed already. Any other Host header is refused.",
        ),
    ] = None,
    roles: RolesOption = None,
) -> None:
    """Serve the web dashboard: the team board, task pages, the escalation inbox,
    contracts and the live event stream (no CDN, nothing to build)."""
    import uvicorn

    from rolebus.web.app import create_app
    from rolebus.web.guard import LOOPBACK

    settings = settings_for(roles)
    team = team_for(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        token = secrets.token_urlsafe(16)
    run(_check_server(settings))  # a clear error now, not a traceback from uvicorn's startup
    hosts = {*LOOPBACK, *(name.lower() for name in allow_host or [])}
    if host not in ("0.0.0.0", "::"):
        hosts.add(host.lower())
    app_ = create_app(settings, team, token=token, hosts=hosts)
    suffix = f"/?token={token}" if token else "/"
    # Bound before the address is printed: whoever reads the line can connect at once
    # (the kernel queues a connection until the server takes it), and a port in use is
    # a clear error here.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listening = socket.create_server((host, port), family=family)
    except OSError as error:
        raise ConfigError(
            f"cannot serve on {host}:{port}: {error.strerror or error}",
            hint="give another --port (or stop what uses it)",
        ) from error
    out.print(f"rolebus dashboard on http://{host}:{port}{suffix} (Ctrl-C to stop)")
    server = uvicorn.Server(uvicorn.Config(app_, log_level="warning"))
    server.run(sockets=[listening])


async def _check_server(settings: Settings) -> None:
    """Raise the ConnectError (with its hint) when no NATS server answers."""
    async with await Bus.connect(settings, name="rolebus-dashboard-check", provision=False):
        pass


def _spent(spent: dict[str, Any]) -> str:
    """A role's model use in a cell: tokens, and dollars when every price is known."""
    if not spent.get("calls"):
        return "-"
    cost = spent.get("cost_usd")
    return f"{spent['tokens']:,} tok " + (f"${cost:.4f}" if cost is not None else "$?")
