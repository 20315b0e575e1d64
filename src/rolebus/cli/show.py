"""`rolebus show ID`: one task, or a flow's tree, with its records and calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.tree import Tree

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    err,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.errors import ConfigError, NotFoundError
from rolebus.flows.calls import CallStore, call_summary
from rolebus.flows.escalation import EscalationRecord, EscalationStore
from rolebus.flows.record import State, TaskState
from rolebus.flows.state import StateStore, published_tasks
from rolebus.history.flow import Flow, read_flow
from rolebus.history.replay import (
    flow_states,
)
from rolebus.web.flowsvg import render_flow
from rolebus.wire.subjects import WORK_STREAM

_COLOURS: dict[str, str] = {
    State.COMPLETED: "green",
    State.DEAD: "red",
    State.REJECTED: "red",
    State.PARKED: "yellow",
}


def _tree_label(state: TaskState) -> str:
    attempts = f" [{state.attempt} attempts]" if state.attempt > 1 else ""
    colour = _COLOURS.get(state.state, "white")
    detail = state.error or ""
    if state.effects_pending:
        detail = f"effects pending: {state.effects_pending}"
    if state.kind == "handoff" and isinstance(state.result, dict):
        detail = state.result.get("answer", "")
    return (
        f"[bold]{state.role}[/] [{colour}]{state.state}[/] {state.title} "
        f"[dim]({state.task_id}){attempts} {detail}[/]"
    )


async def _explain_missing(bus: Bus, task_id: str) -> NoReturn:
    """No record: a task gets one when a worker picks it up. Say whether it waits."""
    async for _, stored in published_tasks(bus.connection, task_id):
        raise NotFoundError(
            f"task {task_id!r} is published ({stored.subject}, {WORK_STREAM} seq "
            f"{stored.seq}) but no worker has picked it up yet",
            hint="start its role's worker (`rolebus worker ROLE`, or `rolebus up`); "
            "`rolebus status` shows each role's backlog",
        )
    raise NotFoundError(
        f"no task {task_id!r}", hint="`rolebus tasks` lists them; ids are case-sensitive"
    )


def show_command(
    task_id: Annotated[str, typer.Argument(help="A task id (the root of a flow shows it all).")],
    svg: Annotated[
        Path | None,
        typer.Option(
            "--svg",
            metavar="FILE",
            help="Also write the flow as a picture to FILE (SVG: a lane per role, a box "
            "per message, arrows from cause to effect, bars where work waited).",
        ),
    ] = None,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """A task, its state and attempts, and its causal tree across roles: follow-ups,
    handoffs, escalations and decisions."""
    settings = settings_for(roles)
    team = team_for(settings) if svg is not None else None

    async def go() -> tuple[
        TaskState, list[TaskState], list[EscalationRecord], Flow | None, list[dict[str, Any]]
    ]:
        async with await Bus.connect(settings, name="rolebus-show") as bus:
            found = await StateStore(bus.connection).get(task_id)
            if found is None:
                await _explain_missing(bus, task_id)
            flow = found.state.correlation_id or found.state.task_id
            states = await flow_states(bus.connection, flow)
            records = [
                r for r in await EscalationStore(bus.connection).all() if r.correlation_id == flow
            ]
            picture = None if team is None else await read_flow(bus.connection, team, flow)
            calls = await CallStore(bus.connection).for_task(task_id)
            return found.state, states, records, picture, calls

    state, states, records, picture, calls = run(go())
    if svg is not None and picture is not None:
        try:
            svg.write_text(render_flow(picture, standalone=True), encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"cannot write {svg}: {error.strerror}",
                hint="give a file in a folder you can write",
            ) from None
        err.print(
            f"wrote {svg}: {len(picture.lanes)} lanes, {len(picture.boxes)} boxes "
            f"(open it in a browser; hover a box for its details)",
            highlight=False,
        )
    if as_json:
        print_json(
            {
                "task": state.model_dump(mode="json"),
                "flow": [s.model_dump(mode="json") for s in states],
                "escalations": [r.model_dump(mode="json") for r in records],
                "calls": [call_summary(call) for call in calls],
            }
        )
        return
    nodes: dict[str, Tree] = {}
    known = {s.task_id for s in states} | {r.id for r in records}

    def parent_of(identifier: str | None) -> str | None:
        # Ids are derived from their cause (<cause>-<n>): walk up until a known node.
        while identifier:
            if identifier in known:
                return identifier
            if "-" not in identifier:
                return None
            identifier = identifier.rsplit("-", 1)[0]
        return None

    root = Tree(_tree_label(state))
    nodes[state.task_id] = root
    pending: list[tuple[str, str | None, str]] = [
        (s.task_id, parent_of(s.causation_id), _tree_label(s))
        for s in states
        if s.task_id != state.task_id
    ] + [
        (
            r.id,
            r.task_id,
            f"[yellow]escalation[/] {r.asking_role} -> {r.holder}: {r.question} "
            f"[dim]-> {r.decided_by or 'open'}: {r.decision or ''}[/]",
        )
        for r in records
    ]
    for _ in range(len(pending) + 1):  # attach children once their parent is placed
        rest = []
        for node_id, parent, label in pending:
            if parent in nodes:
                nodes[node_id] = nodes[parent].add(label)
            else:
                rest.append((node_id, parent, label))
        if len(rest) == len(pending):
            break
        pending = rest
    out.print(root)
    if state.result is not None:
        out.print(f"result: {json.dumps(state.result, default=str)}", highlight=False)
    for call in calls:
        line = call_summary(call)
        if line["tool"] is not None:
            out.print(
                f"  tool {line['tool']}({line['arguments']}) {line['latency_ms']} ms -> "
                f"{'[red]error[/] ' if line['error'] else ''}{line['result']}",
                highlight=False,
            )
        else:
            out.print(
                f"  model call {line['call']} {line['model']} {line['tokens']} tokens "
                f"{line['latency_ms']} ms",
                highlight=False,
            )
