"""``rolebus lifecycle``: the rules of a task's life, as a table or a picture.

Both come from :data:`rolebus.flows.lifecycle.TABLE`, the table the workers run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rolebus.cli.app import JsonOption, out, print_json
from rolebus.errors import ConfigError
from rolebus.flows.lifecycle import STAGES, rows
from rolebus.web.lifecyclesvg import render_lifecycle


def lifecycle(
    stage: Annotated[
        str | None,
        typer.Option("--stage", help=f"Only the rows of one stage ({', '.join(STAGES)})."),
    ] = None,
    svg: Annotated[
        Path | None,
        typer.Option("--svg", help="Write the state diagram (SVG) to this file, or - for stdout."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The task lifecycle: what each input does to a task in each stage.

    Every (stage, input) pair has one rule; the workers decide by this table, and the
    diagram (`--svg`) is drawn from it. Example: `rolebus lifecycle --stage
    input-required` shows what reaches a parked task.
    """
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}", hint=f"use one of: {', '.join(STAGES)}")
    if svg is not None:
        picture = render_lifecycle()
        if str(svg) == "-":
            print(picture, end="")
        else:
            svg.write_text(picture)
            out.print(f"wrote {svg}")
        return
    listed = [
        {
            "stage": row_stage,
            "input": kind.__name__,
            "leads_to": [str(target) for target in rule.leads_to],
            "does": rule.does,
        }
        for row_stage, kind, rule in rows()
        if stage in (None, row_stage)
    ]
    if as_json:
        print_json(listed)
        return
    table = Table("stage", "input", "leads to", "what happens", title="the task lifecycle")
    for row in listed:
        leads = ", ".join(row["leads_to"]) or "(stays)"
        table.add_row(str(row["stage"]), str(row["input"]), leads, str(row["does"]))
    out.print(table)
