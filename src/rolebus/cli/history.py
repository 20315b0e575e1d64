"""Commands that look back: demo, replay, show, tasks, rebuild, rerun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table
from rich.tree import Tree

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    app,
    embedded_server_if_needed,
    err,
    keep_whole,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.cli.demo import play
from rolebus.errors import ConfigError, NotFoundError
from rolebus.flows.calls import CallStore, call_summary
from rolebus.flows.escalation import EscalationRecord, EscalationStore
from rolebus.flows.record import STATES, TaskState
from rolebus.flows.state import StateStore, published_tasks
from rolebus.history.flow import Flow, read_flow
from rolebus.history.replay import (
    Replayed,
    ReplayFilter,
    all_states,
    flow_states,
    parse_since,
    rebuild,
    replay,
    stream_named,
)
from rolebus.team.roles import with_model
from rolebus.web.flowsvg import render_flow
from rolebus.wire.messages import Event
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM, sender_of, stream_holding


@app.command()
def demo(
    roles: RolesOption = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Give up after this many seconds (default 90, with --llm 900)."),
    ] = None,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="Play it with LLM roles (examples/llm-team/roles unless --roles) against "
            "the OpenAI-compatible server at OPENAI_BASE_URL.",
        ),
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="With --llm: the model every LLM role uses.")
    ] = None,
) -> None:
    """Play one feature through the whole team, live.

    Starts the embedded server unless NATS_URL is set (or `rolebus server` runs),
    brings up the six roles, prints every message as it flows, then a summary and
    the commands to replay it. No network, no model: the agents are scripted. With
    `--llm` the roles think: set OPENAI_BASE_URL (and OPENAI_API_KEY) first.
    """
    if llm:
        if not os.environ.get("OPENAI_BASE_URL"):
            raise ConfigError(
                "rolebus demo --llm needs OPENAI_BASE_URL: the OpenAI-compatible server "
                "the roles' model runs on",
                hint="for Ollama: export OPENAI_BASE_URL=http://localhost:11434/v1 "
                "OPENAI_API_KEY=ollama (and `ollama pull llama3.2`); for another server, "
                "its /v1 URL, its key in OPENAI_API_KEY, and --model NAME",
            )
        if roles is None:
            roles = Path("examples/llm-team/roles")
            if not roles.is_dir():
                raise ConfigError(
                    "no examples/llm-team/roles here",
                    hint="run it from the rolebus checkout, or give --roles DIR",
                )
    settings = settings_for(roles)
    team = team_for(settings)
    if model is not None:
        team = with_model(team, model)
    with embedded_server_if_needed(settings) as live:
        thinking = " (LLM roles)" if llm else ""
        out.print(
            f"[bold]rolebus demo[/]{thinking}: {len(team)} roles, one feature, "
            "every message shown\n"
        )
        result = run(
            play(
                live,
                team,
                console=out,
                timeout=timeout or (900.0 if llm else 90.0),
                parked_is_quiet=llm,
            )
        )
    if live.nats_url != settings.nats_url:
        # The demo's own server stopped with it; its store (the history) is kept.
        out.print(
            "  (these need a server: run `rolebus server` in another terminal first; the "
            f"demo's history is kept in {settings.home})",
            highlight=False,
        )
    dead = [state for state in result.states if state.state == "dead"]
    if dead:
        # A flow that did not finish is not a demo that worked: say what died, and fail.
        err.print(
            f"[bold red]the flow did not finish:[/] {len(dead)} task(s) dead", highlight=False
        )
        for state in dead:
            err.print(f"  {state.task_id} ({state.role}): {state.error}", highlight=False)
        err.print("  hint: `rolebus dlq list` shows them; `rolebus dlq redrive ID` tries again")
        raise typer.Exit(1)


def _timeline_line(item: Replayed) -> str:
    stored, message = item.stored, item.message
    when = stored.time.strftime("%H:%M:%S.%f")[:-3]
    prefix = f"[dim]{when} #{stored.seq:<5}[/]"
    if message is None:
        return f"{prefix} [red]undecodable[/] {stored.subject}: {item.error}"
    if isinstance(message, Event):
        what = f"{message.entity}.{message.state}"
        title = message.detail.get("title") or message.detail.get("question") or ""
        extra = message.error or ""
        if message.entity == "handoff":
            title = (
                f"{message.detail.get('contract')} {message.detail.get('version')} -> "
                f"{message.detail.get('to')}"
            )
        if message.entity == "escalation" and message.state == "decided":
            extra = f"{message.detail.get('decided_by')}: {message.detail.get('decision')}"
        attempt = f" (attempt {message.attempt})" if message.attempt > 1 else ""
        return (
            f"{prefix} {message.role or '-':>9}  {what:<22} {message.task_id}{attempt}  "
            f"{title} {extra}".rstrip()
        )
    sender = sender_of(stored.subject) or "person"
    title = (
        getattr(message, "title", None)
        or getattr(message, "question", None)
        or getattr(message, "decision", None)
        or getattr(message, "contract", "")
    )
    return f"{prefix} {sender:>9}  {stored.subject:<40} {message.id}  {title}"


@app.command("replay")
def replay_command(
    stream: Annotated[
        str | None,
        typer.Option(
            help="events, work, dlq or timers (default: the one that stores --subject, "
            "else events)."
        ),
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option(
            help="Subject pattern, e.g. 'event.task.*'. 'task.backend.*' also matches what a "
            "role sent (task.backend.<kind>.<sender>)."
        ),
    ] = None,
    role: Annotated[str | None, typer.Option(help="Only what concerns this role.")] = None,
    correlation: Annotated[str | None, typer.Option(help="One flow (its root task id).")] = None,
    since: Annotated[
        str | None, typer.Option(help="A time (RFC 3339) or a duration ago (10m).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="A time, or a duration ago.")] = None,
    from_seq: Annotated[int | None, typer.Option(min=1, help="Start at this sequence.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read a stream back in order, without disturbing any worker.

    The default is a readable timeline; `--json` prints one object per line
    (stream, seq, subject, time, headers, message). Gaps in sequences are reported.
    """
    settings = settings_for(roles)
    team = team_for(settings) if settings.roles_dir.is_dir() else None
    if role is not None and team is not None and role not in team.roles:
        raise ConfigError(
            f"--role {role!r} is not a role of the team",
            hint=f"roles: {', '.join(sorted(team.roles))} (`rolebus roles` lists them)",
        )
    wanted = ReplayFilter(
        stream=_stream_for(stream, subject),
        subject=subject,
        role=role,
        correlation=correlation,
        since=parse_since(since) if since else None,
        until=parse_since(until, option="--until") if until else None,
        from_seq=from_seq,
        follow=follow,
    )

    async def go() -> int:
        count = 0
        async with await Bus.connect(settings, name="rolebus-replay", provision=False) as bus:
            async for item in replay(bus.connection, wanted, team=team):
                count += 1
                if as_json:
                    sys.stdout.write(item.as_json_line() + "\n")
                    continue
                if item.gap_before:
                    out.print(
                        f"[red]-- gap: {item.gap_before} message(s) missing before "
                        f"seq {item.stored.seq} (expired or deleted) --[/]"
                    )
                out.print(_timeline_line(item), highlight=False)
        return count

    try:
        count = run(go())
    except KeyboardInterrupt:
        return
    if not as_json:
        out.print(f"[dim]{count} message(s) from {wanted.stream}[/]")
    if count == 0 and correlation is not None:
        err.print(
            f"[dim]hint:[/] no message of flow {correlation!r} in {wanted.stream}; a flow is "
            "named by its root task's id (`rolebus tasks` lists them)",
            highlight=False,
        )


def _stream_for(stream: str | None, subject: str | None) -> str:
    """The stream to read: the one named, else the one that stores ``subject``.
    Naming a stream that cannot hold ``subject`` is an error, not an empty answer."""
    holder = stream_holding(subject) if subject is not None else None
    if stream is None:
        return holder or EVENTS_STREAM
    named = stream_named(stream)
    if holder is not None and holder != named:
        raise ConfigError(
            f"{named} stores no {subject!r}: those subjects are in {holder}",
            hint=f"drop --stream, or pass --stream {holder}",
        )
    return named


def _tree_label(state: TaskState) -> str:
    attempts = f" [{state.attempt} attempts]" if state.attempt > 1 else ""
    colour = {
        "completed": "green",
        "dead": "red",
        "rejected": "red",
        "input-required": "yellow",
    }.get(state.state, "white")
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


@app.command("show")
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


@app.command("tasks")
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


@app.command("rebuild")
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
