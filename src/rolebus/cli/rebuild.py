"""`rolebus rebuild`: the projections again, from the history alone."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    out,
    print_json,
    run,
    settings_for,
)
from rolebus.history.replay import (
    rebuild,
)


def rebuild_command(as_json: JsonOption = False) -> None:
    """Recompute the task projection from the event stream alone and report every
    difference from the live projection (there should be none). Exit 1 if any."""

    async def go() -> tuple[int, list[Any]]:
        async with await Bus.connect(settings_for(), name="rolebus-rebuild") as bus:
            rebuilt, differences = await rebuild(bus.connection)
            return len(rebuilt), differences

    count, differences = run(go())
    if as_json:
        print_json({"tasks": count, "differences": [vars(d) for d in differences]})
    elif not differences:
        out.print(f"rebuilt {count} tasks from the events: identical to the live projection.")
    else:
        table = Table("task", "live (state, role)", "from events", title="differences")
        for difference in differences:
            table.add_row(difference.task_id, str(difference.live), str(difference.rebuilt))
        out.print(table)
    if differences:
        raise typer.Exit(1)
