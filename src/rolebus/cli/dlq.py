"""``rolebus dlq``: the messages a worker gave up on, why, and putting them back."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    keep_whole,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import ConfigError, RolebusError
from rolebus.flows import dlq
from rolebus.flows.dlq import DeadLetter
from rolebus.wire import codec

dlq_app = typer.Typer(
    help="Dead letters: messages a worker gave up on (undecodable, invalid, failed for "
    "good, or out of attempts), with why.",
    no_args_is_help=True,
)


# --- dead letters --------------------------------------------------------------------------


async def _dead_letters(settings: Settings) -> list[DeadLetter]:
    async with await Bus.connect(settings, name="rolebus-dlq") as bus:
        return [entry async for entry in dlq.list_dead_letters(bus.connection)]


@dlq_app.command("list")
def dlq_list(as_json: JsonOption = False) -> None:
    """List dead letters: sequence, subject, reason, attempts, error."""
    entries = run(_dead_letters(settings_for()))
    if as_json:
        print_json([entry.as_json() for entry in entries])
        return
    if not entries:
        out.print("no dead letters.")
        return
    table = Table(
        "seq", "subject", "task", "reason", "role", "attempts", "error", title="dead letters"
    )
    for entry in entries:
        table.add_row(
            str(entry.seq),
            entry.subject,
            entry.task_id or "-",
            entry.reason,
            entry.role,
            str(entry.attempts),
            entry.error[:80],
        )
    out.print(keep_whole(table, 2))


@dlq_app.command("show")
def dlq_show(
    key: Annotated[str, typer.Argument(help="DLQ sequence number or task id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter with its headers and decoded message."""

    async def go() -> tuple[DeadLetter, Any]:
        async with await Bus.connect(settings_for(), name="rolebus-dlq") as bus:
            entry = await dlq.find(bus.connection, key)
        try:
            body: Any = codec.decode(entry.subject, entry.message.data).model_dump(mode="json")
        except RolebusError as error:
            body = {"undecodable": error.message, "bytes": entry.message.data[:200].hex()}
        return entry, body

    entry, body = run(go())
    document = {**entry.as_json(), "headers": dict(entry.message.headers), "message": body}
    if as_json:
        print_json(document)
        return
    for key_name, value in document.items():
        shown = (
            json.dumps(value, indent=2, default=str) if isinstance(value, dict | list) else value
        )
        out.print(f"[bold]{key_name}[/]: {shown}", highlight=False, markup=False)


@dlq_app.command("redrive")
def dlq_redrive(
    key: Annotated[str | None, typer.Argument(help="DLQ sequence number or task id.")] = None,
    redrive_all: Annotated[bool, typer.Option("--all", help="Redrive every dead letter.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Put dead letters back on their original subject (the worker runs them again)."""
    if (key is None) == (not redrive_all):
        raise ConfigError("give one dead letter (its sequence or task id) or --all, not both")

    async def go() -> list[dict[str, Any]]:
        async with await Bus.connect(settings_for(), name="rolebus-dlq") as bus:
            if redrive_all:
                entries = [entry async for entry in dlq.list_dead_letters(bus.connection)]
            else:
                assert key is not None
                entries = [await dlq.find(bus.connection, key)]
            done = []
            for entry in entries:
                why = dlq.refusal(entry, team)
                row: dict[str, Any] = {
                    "dlq_seq": entry.seq,
                    "subject": entry.subject,
                    "task_id": entry.task_id,
                    "role": entry.role,
                }
                if why is None:
                    row["seq"] = (await dlq.redrive(bus.connection, entry)).seq
                else:
                    row["refused"] = why
                done.append(row)
            return done

    team = team_for(settings_for())
    done = run(go())
    refused = [item for item in done if "refused" in item]
    if as_json:
        print_json(done)
    else:
        for item in done:
            name = item["task_id"] or "message"
            if "refused" in item:
                out.print(
                    f"not redriven: dead letter {item['dlq_seq']} ({name}): {item['refused']}"
                )
            else:
                out.print(f"redriven {name} to {item['subject']} (seq {item['seq']})")
        if not done:
            out.print("no dead letters.")
    if refused:
        raise typer.Exit(1)
