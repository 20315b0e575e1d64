"""``rolebus demo``: one feature played through the whole team, live.

The six roles run in this process with their scripted agents
(:mod:`rolebus.handlers.team`), on the embedded server or ``NATS_URL``. Every
message is printed as it flows; at the end a summary shows tasks by role and
state, escalations, contract versions and latency, and the commands to replay
what just happened. Each run is a new flow; the history keeps them all.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rolebus.bus import Bus
from rolebus.cli.app import (
    RolesOption,
    embedded_server_if_needed,
    err,
    keep_whole,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.config import Settings
from rolebus.errors import CodecError, ConfigError, RolebusError
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.escalation import EscalationRecord, EscalationStore
from rolebus.flows.record import State, TaskState
from rolebus.history.replay import (
    flow_states,
)
from rolebus.nats.delivery import StoredMessage, Subscription
from rolebus.team.roles import RoleSpec, Team, with_model
from rolebus.wire import codec
from rolebus.wire.messages import Decision, Escalation, Event, Handoff, Task
from rolebus.wire.subjects import (
    WORK_STREAM,
    consumer_name,
    sender_of,
)
from rolebus.worker.runner import Crew, start_workers

__all__ = ["DemoResult", "play"]

FEATURE = "Order history page"


#: The ends of an attempt the demo prints in red.
_LOUD = frozenset({State.RETRYING, State.REJECTED, State.DEAD})


@dataclass
class DemoResult:
    root: Task
    states: list[TaskState]
    escalations: list[EscalationRecord]
    seconds: float
    lines: list[str] = field(default_factory=list)


class FlowPrinter:
    """Prints each message of one flow as it is published."""

    def __init__(self, console: Console, team: Team, root_id: str) -> None:
        self.console = console
        self.team = team
        self.root_id = root_id
        self.started = time.monotonic()
        self.lines: list[str] = []

    def _receiver(self, subject: str) -> str:
        family, second, _ = [*subject.split("."), "", ""][:3]
        if family == "task":
            return self.team.domain_owner.get(second, "?")
        return second

    def _in_flow(self, message: Any) -> bool:
        return self.root_id in (message.id, message.correlation_id)

    async def on_message(self, stored: StoredMessage) -> None:
        try:
            message = codec.decode(stored.subject, stored.data, origin=stored.origin())
        except CodecError:
            return
        if not self._in_flow(message):
            return
        line = self._describe(stored.subject, message)
        if line is not None:
            self.lines.append(line)
            elapsed = time.monotonic() - self.started
            self.console.print(f"[dim]{elapsed:6.2f}s[/]  {line}", highlight=False)

    def _describe(self, subject: str, message: Any) -> str | None:
        sender = sender_of(subject) or "person"
        arrow = f"{sender:>9} -> {self._receiver(subject):<9}"
        if isinstance(message, Task):
            return f"{arrow} [cyan]{subject}[/]  {message.title}"
        if isinstance(message, Handoff):
            what = "here is the API contract" if message.status == "offered" else message.status
            extra = f" ({'; '.join(message.reasons)})" if message.reasons else ""
            return (
                f"{arrow} [magenta]{subject}[/]  {message.contract} {message.version}: "
                f"{what}{extra}"
            )
        if isinstance(message, Escalation):
            return f"{arrow} [yellow]{subject}[/]  {message.question}"
        if isinstance(message, Decision):
            verdict = {True: "approved: ", False: "rejected: ", None: ""}[message.approved]
            return f"{arrow} [green]{subject}[/]  {verdict}{message.decision}"
        if (
            isinstance(message, Event)
            and message.state == State.COMPLETED
            and isinstance(message.result, dict)
            and "met" in message.result
        ):
            report = ", ".join(f"{key} {value}" for key, value in message.result.items())
            return f"{message.role or '?':>9}    [green]reports[/]   {report}"
        if isinstance(message, Event) and message.state in (
            State.RETRYING,
            State.REJECTED,
            State.DEAD,
        ):
            return (
                f"{message.role or '?':>9}    [red]{message.state:<9}[/] "
                f"task {message.task_id}: {message.error}"
            )
        return None


async def _quiet(
    bus: Bus, team: Team, root_id: str, *, parked_is_quiet: bool = False
) -> list[TaskState] | None:
    """The flow's states once nothing is left to do (else None). ``parked_is_quiet``:
    a task waiting for a decision counts as settled (a model's flow may end asking
    a person)."""
    states = await flow_states(bus.connection, root_id)
    settled = [
        state.terminal or (parked_is_quiet and state.state == State.PARKED) for state in states
    ]
    if not states or not all(settled):
        return None
    for role in team:
        backlog = await bus.connection.admin.consumer_state(WORK_STREAM, consumer_name(role.id))
        if backlog["pending"] or backlog["ack_pending"]:
            return None
    return states


async def play(
    settings: Settings,
    team: Team,
    *,
    console: Console,
    timeout: float = 90.0,
    parked_is_quiet: bool = False,
    worker_settings: Callable[[RoleSpec], Settings] | None = None,
) -> DemoResult:
    """Run the team, publish the feature, print the flow until it is done
    (``worker_settings``: each role's worker on its own user; the demo watches with
    ``settings``)."""
    crew: Crew = await start_workers(worker_settings or settings, team, list(team), grace=2)
    bus = await Bus.connect(settings, name="rolebus-demo")
    subscriptions: list[Subscription] = []
    try:
        root = Task(
            kind="feature", title=FEATURE, payload={"for": "customers who want to see past orders"}
        )
        printer = FlowPrinter(console, team, root.id)
        for pattern in ("task.>", "handoff.>", "escalation.>", "decision.>", "event.task.>"):
            subscriptions.append(await bus.connection.watch(pattern, printer.on_message))
        await bus.connection.flush()
        started = time.monotonic()
        await bus.publish("task.product.feature", root)
        deadline = started + timeout
        while (states := await _quiet(bus, team, root.id, parked_is_quiet=parked_is_quiet)) is None:
            if time.monotonic() > deadline:
                raise RolebusError(
                    f"the demo flow {root.id} did not finish within {timeout:.0f}s",
                    hint=f"see what is stuck: rolebus show {root.id}",
                )
            await asyncio.sleep(0.2)
        seconds = time.monotonic() - started
        records = [
            record
            for record in await EscalationStore(bus.connection).all()
            if record.correlation_id == root.id
        ]
        result = DemoResult(
            root=root, states=states, escalations=records, seconds=seconds, lines=printer.lines
        )
        await print_summary(console, bus, result)
        return result
    finally:
        for subscription in subscriptions:
            await subscription.close()
        await bus.close()
        await crew.stop(grace=2)


def latency_ms(states: list[TaskState]) -> tuple[float, float]:
    """p50 and p99 of publish -> done for the flow's tasks, in milliseconds."""
    samples = sorted(
        (state.updated_at - state.created_at).total_seconds() * 1000
        for state in states
        if state.created_at is not None and state.state == State.COMPLETED
    )
    if not samples:
        return 0.0, 0.0
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return statistics.median(samples), p99


async def print_summary(console: Console, bus: Bus, result: DemoResult) -> None:
    by_role: dict[str, dict[str, int]] = {}
    for state in result.states:
        kind = state.kind if state.kind in ("handoff", "escalation", "handoff-answer") else "task"
        cell = by_role.setdefault(state.role, {})
        cell[f"{kind} {state.state}"] = cell.get(f"{kind} {state.state}", 0) + 1
    table = Table("role", "what it did", title=f"flow {result.root.id}: {result.root.title}")
    for role in sorted(by_role):
        table.add_row(
            role, ", ".join(f"{count} {what}" for what, count in sorted(by_role[role].items()))
        )
    console.print(table)

    escalations = Table(
        "escalation", "asked by", "decided by", "reason", "decision", title="escalations"
    )
    for record in sorted(result.escalations, key=lambda r: r.opened_at):
        escalations.add_row(
            record.id,
            record.asking_role,
            record.decided_by or "-",
            record.reason,
            record.decision or "(open)",
        )
    console.print(keep_whole(escalations, 0))

    registry = ContractRegistry(bus.connection)
    contracts = Table(
        "contract", "version", "by", "accepted by", "changes requested", title="contracts"
    )
    for name in await registry.names():
        for entry in await registry.versions(name):
            contracts.add_row(
                name,
                entry.document.version,
                entry.author,
                ", ".join(entry.accepted_by) or "-",
                "; ".join(f"{who}: {' '.join(why)}" for who, why in entry.changes_requested.items())
                or "-",
            )
    console.print(contracts)

    p50, p99 = latency_ms(result.states)
    # Counted from the failed outcomes: a resumed task's last attempt is the
    # decision's delivery, which says nothing of the retries before it.
    retried = sum(1 for state in result.states if state.failures)
    console.print(
        f"{len(result.states)} work items in {result.seconds:.1f}s; "
        f"task latency p50 {p50:.0f} ms, p99 {p99:.0f} ms; {retried} retried; "
        f"{len(result.escalations)} escalations."
    )
    root = result.root.id
    console.print("\n[bold]Replay what just happened:[/]")
    console.print(f"  rolebus replay --correlation {root}          # the timeline", highlight=False)
    console.print(
        f"  rolebus replay --correlation {root} --json   # as JSON lines", highlight=False
    )
    console.print(
        f"  rolebus show {root}                          # the causal tree", highlight=False
    )
    console.print(
        "  rolebus escalations --all; rolebus contracts diff orders-api 1.0.0 1.1.0",
        highlight=False,
    )


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
    dead = [state for state in result.states if state.state == State.DEAD]
    if dead:
        # A flow that did not finish is not a demo that worked: say what died, and fail.
        err.print(
            f"[bold red]the flow did not finish:[/] {len(dead)} task(s) dead", highlight=False
        )
        for state in dead:
            err.print(f"  {state.task_id} ({state.role}): {state.error}", highlight=False)
        err.print("  hint: `rolebus dlq list` shows them; `rolebus dlq redrive ID` tries again")
        raise typer.Exit(1)
