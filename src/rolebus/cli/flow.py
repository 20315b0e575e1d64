"""Commands for what flows between roles: contracts, escalations, decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    app,
    keep_whole,
    out,
    print_json,
    run,
    settings_for,
    team_for,
    team_if_any,
)
from rolebus.errors import ConfigError
from rolebus.flows.cancels import cancel
from rolebus.flows.contracts import ContractRegistry, diff, load_document
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.team.roles import PERSON

contracts_app = typer.Typer(
    help="API contracts: semver versions in a registry; breaking changes need a major bump.",
    no_args_is_help=True,
)
app.add_typer(contracts_app, name="contracts")


def _registry(bus: Bus) -> ContractRegistry:
    """The contracts, read and written as the role files say who may author them."""
    return ContractRegistry(bus.connection, team=team_if_any(settings_for()))


@contracts_app.command("list")
def contracts_list(as_json: JsonOption = False) -> None:
    """Every contract with its versions and who accepted each."""

    async def go() -> list[dict[str, Any]]:
        async with await Bus.connect(settings_for(), name="rolebus-contracts") as bus:
            registry = _registry(bus)
            rows = []
            for name in await registry.names():
                for entry in await registry.versions(name):
                    rows.append(
                        {
                            "name": name,
                            "version": entry.document.version,
                            "author": entry.author,
                            "operations": sorted(entry.document.operations),
                            "accepted_by": entry.accepted_by,
                            "changes_requested": entry.changes_requested,
                        }
                    )
            return rows

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("no contracts yet: `rolebus contracts publish FILE` registers one.")
        return
    table = Table(
        "contract",
        "version",
        "author",
        "operations",
        "accepted by",
        "changes requested",
        title="contracts",
    )
    for row in rows:
        table.add_row(
            row["name"],
            row["version"],
            row["author"],
            ", ".join(row["operations"]),
            ", ".join(row["accepted_by"]) or "-",
            "; ".join(f"{role}: {', '.join(why)}" for role, why in row["changes_requested"].items())
            or "-",
        )
    out.print(table)


@contracts_app.command("show")
def contracts_show(
    name: Annotated[str, typer.Argument(help="The contract's name.")],
    version: Annotated[str | None, typer.Option(help="A version (default: the latest).")] = None,
) -> None:
    """Print one contract version as JSON (document, author, answers)."""

    async def go() -> dict[str, Any]:
        async with await Bus.connect(settings_for(), name="rolebus-contracts") as bus:
            entry = await _registry(bus).get(name, version)
            return entry.model_dump(mode="json")

    print_json(run(go()))


@contracts_app.command("diff")
def contracts_diff(
    name: Annotated[str, typer.Argument(help="The contract's name.")],
    old: Annotated[str, typer.Argument(help="The older version.")],
    new: Annotated[str, typer.Argument(help="The newer version.")],
    as_json: JsonOption = False,
) -> None:
    """What changed between two versions: breaking changes first."""

    async def go() -> tuple[list[str], list[str]]:
        async with await Bus.connect(settings_for(), name="rolebus-contracts") as bus:
            registry = _registry(bus)
            before = await registry.get(name, old)
            after = await registry.get(name, new)
            return diff(before.document, after.document)

    breaking, compatible = run(go())
    if as_json:
        print_json({"breaking": breaking, "compatible": compatible})
        return
    out.print(f"[bold]{name} {old} -> {new}[/]")
    for line in breaking:
        out.print(f"  [red]breaking[/]   {line}", highlight=False)
    for line in compatible:
        out.print(f"  [green]compatible[/] {line}", highlight=False)
    if not breaking and not compatible:
        out.print("  no changes to operations or fields")


@contracts_app.command("publish")
def contracts_publish(
    file: Annotated[Path, typer.Argument(help="A contract document (JSON).")],
    author: Annotated[str, typer.Option(help="Who publishes it (a role id).")] = PERSON,
) -> None:
    """Register a contract version; refused (with the diff) if it breaks the latest
    version without a major version bump."""
    document = load_document(file)

    async def go() -> None:
        async with await Bus.connect(settings_for(), name="rolebus-contracts") as bus:
            await _registry(bus).publish(document, author=author)

    run(go())
    out.print(f"published {document.name} {document.version}")


@app.command("escalations")
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


@app.command("resolve")
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


@app.command("cancel")
def cancel_command(
    task_id: Annotated[str, typer.Argument(help="The task to cancel.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in its record).")] = "",
    tree: Annotated[
        bool, typer.Option("--tree", help="Cancel what it caused too (its follow-ups, ...).")
    ] = False,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a task, from any machine: queued, it is skipped when delivered; running,
    it is stopped (a command gets SIGTERM, then SIGKILL after a grace; a model call is
    aborted). It ends `cancelled`, and none of its follow-ups are published."""
    settings = settings_for(roles)
    team = team_for(settings)

    async def go() -> list[str]:
        async with await Bus.connect(settings, name="rolebus-cancel") as bus:
            return await cancel(
                bus.connection,
                task_id,
                reason=reason or "cancelled by a person",
                tree=tree,
                team=team,
            )

    cancelled = run(go())
    if as_json:
        print_json({"cancelled": cancelled})
        return
    out.print(f"cancelled {', '.join(cancelled)}", highlight=False)
