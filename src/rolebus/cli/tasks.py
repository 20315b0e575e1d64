"""`rolebus tasks`: every task's newest record, by role or state."""

from __future__ import annotations

from typing import Annotated

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
from rolebus.errors import ConfigError
from rolebus.flows.record import STATES, TaskState
from rolebus.history.replay import (
    all_states,
)


def tasks_command(
    role: Annotated[str | None, typer.Option(help="Only this role's.")] = None,
    state: Annotated[str | None, typer.Option(help="Only in this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """What every role is doing: the task-state projection, in one read."""
    if state is not None and state not in STATES:
        raise ConfigError(
            f"--state {state!r} is not a task state", hint=f"states: {', '.join(sorted(STATES))}"
        )
    if role is not None:
        known = team_for(settings_for()).roles
        if role not in known:
            raise ConfigError(
                f"--role {role!r} is not a role of the team",
                hint=f"roles: {', '.join(sorted(known))}",
            )

    async def go() -> list[TaskState]:
        async with await Bus.connect(settings_for(), name="rolebus-tasks") as bus:
            return await all_states(bus.connection)

    rows = [
        s
        for s in run(go())
        if (role is None or s.role == role) and (state is None or s.state == state)
    ]
    rows.sort(key=lambda s: s.updated_at)
    if as_json:
        print_json([s.model_dump(mode="json", exclude={"effects"}) for s in rows])
        return
    table = Table("task", "role", "state", "kind", "attempt", "title", "updated", title="tasks")
    for s in rows:
        table.add_row(
            s.task_id,
            s.role,
            s.state,
            s.kind,
            str(s.attempt),
            s.title,
            s.updated_at.strftime("%H:%M:%S"),
        )
    out.print(keep_whole(table, 0))
