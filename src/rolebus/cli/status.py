"""`rolebus status`: what every role is doing, against its SLOs."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.history.status import RoleStatus, collect
from rolebus.team.durations import parse_duration


def _cell(check: dict[str, Any], unit: str = "") -> str:
    value, target, met = check["value"], check["target"], check["met"]
    if target is None:
        return "-" if value is None else f"{value:.4g}{unit}"
    shown = "no data" if value is None else f"{value:.4g}{unit}"
    mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[dim]?[/]"}[met]
    return f"{shown} / {target:g}{unit} {mark}"


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


def _spent(spent: dict[str, Any]) -> str:
    """A role's model use in a cell: tokens, and dollars when every price is known."""
    if not spent.get("calls"):
        return "-"
    cost = spent.get("cost_usd")
    return f"{spent['tokens']:,} tok " + (f"${cost:.4f}" if cost is not None else "$?")
