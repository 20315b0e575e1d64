"""`rolebus cancel`: stop a task (and what it caused)."""

from __future__ import annotations

from typing import Annotated

import typer

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
from rolebus.flows.cancels import cancel


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
