"""`rolebus prompt ID`: the prompt a role's model would be given for a task."""

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
from rolebus.errors import NotFoundError
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.record import State, TaskState
from rolebus.flows.state import StateStore, published_tasks
from rolebus.handlers.prompt import prompt_messages
from rolebus.history.rerun import context_for, work_item
from rolebus.wire.messages import Task
from rolebus.wire.subjects import WORK_STREAM


def prompt_command(
    role: Annotated[str, typer.Argument(help="The role whose model would be asked.")],
    task_id: Annotated[str, typer.Argument(help="A task (handled, or waiting for a worker).")],
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print what the role's model would be sent for a task: the system message (the
    role's identity card, the team, the outcome protocol) and the user message (the
    task and its context). Nothing is sent; no key is needed."""
    settings = settings_for(roles)
    team = team_for(settings)
    spec = team.role(role)

    async def go() -> list[dict[str, str]]:
        async with await Bus.connect(settings, name="rolebus-prompt", provision=False) as bus:
            found = await StateStore(bus.connection).get(task_id)
            if found is not None:
                state = found.state
                task = await work_item(bus.connection, state)
                if task is None:
                    raise NotFoundError(f"task {task_id!r} is no longer in {WORK_STREAM}")
            else:
                task, subject = await _published_task(bus, task_id)
                state = TaskState(
                    task_id=task.id,
                    role=spec.id,
                    state=State.CLAIMED,
                    subject=subject,
                    kind=task.kind,
                    title=task.title,
                )
            contracts = await ContractRegistry(bus.connection, team=team).resolve(
                task.payload.get("contracts")
            )
            context = context_for(spec, team, state, task, contracts, calls=None)
            return prompt_messages(task, context)

    messages = run(go())
    if as_json:
        print_json(messages)
        return
    for message in messages:
        out.print(f"[bold]--- {message['role']} ---[/]")
        out.print(message["content"], markup=False, highlight=False)


async def _published_task(bus: Bus, task_id: str) -> tuple[Task, str]:
    """A task no worker has picked up yet, and its subject."""
    async for task, stored in published_tasks(bus.connection, task_id):
        return task, stored.subject
    raise NotFoundError(
        f"no task {task_id!r}", hint="`rolebus tasks` lists them; ids are case-sensitive"
    )
