"""`rolebus contracts`: the contract registry (list, show, diff, publish)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    out,
    print_json,
    run,
    settings_for,
    team_if_any,
)
from rolebus.flows.contracts import ContractRegistry, diff, load_document
from rolebus.team.roles import PERSON

contracts_app = typer.Typer(
    help="API contracts: semver versions in a registry; breaking changes need a major bump.",
    no_args_is_help=True,
)


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
