"""``rolebus budget``: what each role may spend on model calls, has spent, and has left."""

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
from rolebus.errors import ConfigError
from rolebus.flows.budgets import BudgetLedger
from rolebus.flows.effects import publish_event
from rolebus.team.roles import RoleSpec
from rolebus.wire.messages import Event, new_id

_CAPS = ("usd_per_day", "tokens_per_day", "tokens_per_task")


async def _row(ledger: BudgetLedger, role: RoleSpec) -> dict[str, Any]:
    caps = await ledger.caps(role)
    spent = await ledger.spent_today(role.id)
    left = {
        "usd_per_day": None if caps.usd_per_day is None else caps.usd_per_day - spent.usd,
        "tokens_per_day": (
            None if caps.tokens_per_day is None else caps.tokens_per_day - spent.tokens
        ),
    }
    return {
        "role": role.id,
        "caps": {name: getattr(caps, name) for name in _CAPS},
        "approver": role.budget_approver,
        "spent_today": {"tokens": spent.tokens, "usd": round(spent.usd, 6)},
        "left_today": left,
    }


def budget_command(
    words: Annotated[
        list[str] | None,
        typer.Argument(
            help="Nothing (every role), ROLE, or `set ROLE` with the caps to change.",
            show_default=False,
        ),
    ] = None,
    usd_per_day: Annotated[
        float | None, typer.Option("--usd-per-day", help="With set: US dollars a day (UTC).")
    ] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option("--tokens-per-day", help="With set: tokens a day (UTC).")
    ] = None,
    tokens_per_task: Annotated[
        int | None, typer.Option("--tokens-per-task", help="With set: tokens for one task.")
    ] = None,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Budgets: each role's caps on model spending (its role file's [budget] table, or
    set at run time), what it spent today (UTC), what is left, and who approves more.

    `rolebus budget set ROLE --usd-per-day N` changes a cap at run time for every
    replica at once, recorded as an event.budget.changed.
    """
    words = words or []
    changes = {
        "usd_per_day": usd_per_day,
        "tokens_per_day": tokens_per_day,
        "tokens_per_task": tokens_per_task,
    }
    if words[:1] == ["set"]:
        if len(words) != 2:
            raise ConfigError(
                "`rolebus budget set` takes one role",
                hint="rolebus budget set ROLE --usd-per-day 5",
            )
        _set(words[1], changes, roles, as_json)
        return
    if any(value is not None for value in changes.values()):
        raise ConfigError("caps are changed with `rolebus budget set ROLE ...`")
    if len(words) > 1:
        raise ConfigError(f"one role at most, not {len(words)}", hint="rolebus budget [ROLE]")
    _show(words[0] if words else None, roles, as_json)


def _show(role: str | None, roles: Any, as_json: bool) -> None:
    settings = settings_for(roles)
    team = team_for(settings)
    chosen = [team.role(role)] if role else list(team)

    async def go() -> list[dict[str, Any]]:
        async with await Bus.connect(settings, name="rolebus-budget") as bus:
            ledger = BudgetLedger(bus.connection)
            return [await _row(ledger, spec) for spec in chosen]

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    table = Table(
        "role",
        "cap $/day",
        "cap tokens/day",
        "cap tokens/task",
        "spent today",
        "left today",
        "approver",
        title="budgets",
    )
    for row in rows:
        caps, spent, left = row["caps"], row["spent_today"], row["left_today"]

        def show(value: float | int | None, money: bool = False) -> str:
            if value is None:
                return "-"
            return f"${value:,.4f}" if money else f"{value:,}"

        table.add_row(
            row["role"],
            show(caps["usd_per_day"], money=True),
            show(caps["tokens_per_day"]),
            show(caps["tokens_per_task"]),
            f"{spent['tokens']:,} tok, ${spent['usd']:.4f}",
            _left(left),
            row["approver"] or "-",
        )
    out.print(table)


def _set(role: str, changes: dict[str, Any], roles: Any, as_json: bool) -> None:
    settings = settings_for(roles)
    team = team_for(settings)
    spec = team.role(role)
    given = {name: value for name, value in changes.items() if value is not None}
    if not given:
        raise ConfigError(
            "say which cap to set",
            hint="--usd-per-day N, --tokens-per-day N or --tokens-per-task N",
        )
    for name, value in given.items():
        if value < 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value:g} is negative",
                hint="a cap is 0 (nothing may be spent) or more",
            )

    async def go() -> dict[str, Any]:
        async with await Bus.connect(settings, name="rolebus-budget") as bus:
            ledger = BudgetLedger(bus.connection)
            before = await ledger.caps(spec)
            await ledger.set_caps(spec.id, **given)
            row = await _row(ledger, spec)
            event = Event(
                id=new_id(),
                entity="budget",
                state="changed",
                task_id=spec.id,
                role=None,
                detail={
                    "role": spec.id,
                    "before": {name: getattr(before, name) for name in _CAPS},
                    "after": row["caps"],
                    "by": "person",
                },
            )
            await (await publish_event(bus.connection, event, trace=None)).result()
            return row

    row = run(go())
    if as_json:
        print_json(row)
        return
    out.print(
        f"{spec.id}: "
        + ", ".join(f"{name} = {value}" for name, value in row["caps"].items() if value is not None)
    )


def _left(left: dict[str, Any]) -> str:
    parts = []
    if left["usd_per_day"] is not None:
        parts.append(f"${left['usd_per_day']:,.4f}")
    if left["tokens_per_day"] is not None:
        parts.append(f"{left['tokens_per_day']:,} tok")
    return " / ".join(parts) or "-"
