"""`rolebus escalations` and `rolebus resolve`: the open questions, and a person's answer."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    keep_whole,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.errors import ConfigError
from rolebus.flows.escalation import EscalationStore, resolve


def escalations_command(
    role: Annotated[str | None, typer.Option(help="Only those this role must answer.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Decided ones too.")] = False,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Open escalations: who asks, who must answer, the question and the options."""
    settings = settings_for(roles)
    team = team_for(settings)

    async def go() -> list[dict[str, Any]]:
        async with await Bus.connect(settings, name="rolebus-escalations") as bus:
            records = await EscalationStore(bus.connection).all()
        rows = []
        for record in sorted(records, key=lambda r: r.opened_at):
            holder = record.current_holder(team)
            if (record.status != "open" and not show_all) or (role and holder != role):
                continue
            rows.append({**record.model_dump(mode="json"), "holder": holder})
        return rows

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("no open escalations.")
        return
    table = Table(
        "id",
        *(["status"] if show_all else []),
        "asks",
        "must answer",
        "reason",
        "kind",
        "level",
        "question",
        "options",
        "deadline",
        title="escalations" if show_all else "open escalations",
    )
    for row in rows:
        options = "\n".join(f"{o['name']}: {o.get('tradeoffs', '')}" for o in row["options"])
        table.add_row(
            row["id"],
            *([row["status"]] if show_all else []),
            row["asking_role"],
            row["holder"],
            row["reason"],
            row["kind"],
            str(row["level"]),
            row["question"],
            options or "-",
            str(row["deadline"] or "-")[:19],
        )
    out.print(keep_whole(table, 0))
    if any(row["status"] == "open" for row in rows):
        out.print("Answer one with `rolebus resolve ID --decision TEXT [--approve | --reject]`.")


def resolve_command(
    escalation_id: Annotated[str, typer.Argument(help="The escalation's id.")],
    decision: Annotated[str, typer.Option("--decision", "-d", help="Your answer.")],
    approve: Annotated[bool, typer.Option("--approve", help="Approve (approvals).")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="Reject (approvals).")] = False,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Answer an escalation as a person; the parked task resumes with your decision."""
    if approve and reject:
        raise ConfigError("give --approve or --reject, not both")
    approved = True if approve else False if reject else None
    settings = settings_for(roles)
    team = team_for(settings)

    async def go() -> dict[str, Any]:
        async with await Bus.connect(settings, name="rolebus-resolve") as bus:
            record = await resolve(
                bus.connection, team, escalation_id, decision=decision, approved=approved
            )
            return record.model_dump(mode="json")

    record = run(go())
    if as_json:
        print_json(record)
        return
    verdict = {True: "approved", False: "rejected", None: "answered"}[approved]
    out.print(
        f"{verdict} escalation {escalation_id}; {record['asking_role']} resumes "
        f"task {record['task_id']}."
    )
