"""What a handler would do, or be told: rerun (recorded inputs through a handler,
nothing published) and prompt (what an LLM role's model would be sent)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    app,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.errors import NotFoundError
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.record import TaskState
from rolebus.flows.state import StateStore, published_tasks
from rolebus.handlers.llm import LlmRunner
from rolebus.handlers.loader import load_handler
from rolebus.handlers.prompt import prompt_messages
from rolebus.history.replay import parse_since
from rolebus.history.rerun import RerunResult, context_for, rerun, work_item
from rolebus.team.handler_specs import CommandHandler
from rolebus.wire.messages import Task
from rolebus.wire.subjects import WORK_STREAM


@app.command("rerun")
def rerun_command(
    role: Annotated[str, typer.Option(help="Whose recorded inputs to replay.")],
    handler: Annotated[
        str | None,
        typer.Option(
            help="The handler to try: builtin:NAME, python:module:function, or a command "
            "line (run with the command protocol). Default: the role's own, as its role "
            "file says now (a changed persona or model, say)."
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Call the model again (LLM roles). Without it, model calls are answered "
            "from their records: a rerun costs nothing.",
        ),
    ] = False,
    correlation: Annotated[str | None, typer.Option(help="Only this flow.")] = None,
    since: Annotated[str | None, typer.Option(help="Only inputs since (time or 10m).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per command run.")] = 300.0,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Feed a role's recorded inputs to another handler WITHOUT publishing anything,
    and print how its outcomes differ from the recorded ones. Exit 1 if any differ."""
    settings = settings_for(roles)
    team = team_for(settings)
    spec = team.role(role)
    if handler is None:
        chosen = load_handler(spec.handler, role=role)
    elif handler.startswith(("builtin:", "python:")):
        chosen = load_handler(handler, role=role)
    else:
        chosen = load_handler(CommandHandler(command=shlex.split(handler), timeout=timeout))
    start = parse_since(since) if since else None

    async def go() -> list[RerunResult]:
        async with await Bus.connect(settings, name="rolebus-rerun") as bus:
            try:
                return [
                    result
                    async for result in rerun(
                        bus.connection,
                        spec,
                        chosen,
                        correlation=correlation,
                        since=start,
                        team=team,
                        live=live,
                    )
                ]
            finally:
                if isinstance(chosen, LlmRunner):
                    await chosen.aclose()

    results = run(go())
    if as_json:
        print_json([result.as_json() for result in results])
    else:
        for result in results:
            if result.error is not None:
                out.print(
                    f"[yellow]error[/]    {result.task_id}  {result.title}: {result.error}",
                    highlight=False,
                )
            elif result.same:
                out.print(f"[green]same[/]     {result.task_id}  {result.title}", highlight=False)
            else:
                out.print(f"[red]differs[/]  {result.task_id}  {result.title}", highlight=False)
                out.print(result.diff(), highlight=False, markup=False)
        changed = sum(not result.same for result in results)
        out.print(f"{len(results)} recorded input(s) of {role}; {changed} differ.")
    if any(not result.same for result in results):
        raise typer.Exit(1)


@app.command("prompt")
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
                    state="claimed",
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
