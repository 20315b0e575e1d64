"""What-if: feed a role's recorded inputs to another handler, publish nothing, and
diff its answers against what was recorded (to try a new prompt or agent version
on real traffic)."""

from __future__ import annotations

import difflib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rolebus.errors import CodecError, RolebusError
from rolebus.flows.calls import CallStore
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.escalation import EscalationStore
from rolebus.flows.escalation_rules import escalation_item
from rolebus.flows.handoffs import review_item
from rolebus.flows.record import State, TaskState
from rolebus.handlers.base import CallLog, Handler, HandlerContext, NeedsLiveError
from rolebus.history.replay import all_states
from rolebus.nats.connection import Connection
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire import codec
from rolebus.wire.messages import Decision, Escalation, Handoff, Outcome, Task
from rolebus.wire.subjects import WORK_STREAM

__all__ = ["RerunResult", "context_for", "rerun", "work_item"]


@dataclass(frozen=True)
class RerunResult:
    task_id: str
    title: str
    recorded: dict[str, Any] | None
    new: dict[str, Any]
    #: Why this input could not be run again (its contract is gone, say); the
    #: other inputs are still compared.
    error: str | None = None
    #: What each side cost: the recorded attempt's usage, and the rerun's.
    recorded_usage: dict[str, Any] | None = None
    new_usage: dict[str, Any] | None = None
    #: The recorded task's end (completed, dead, rejected, ...).
    recorded_state: str = ""

    @property
    def same(self) -> bool:
        return self.error is None and self.recorded == self.new

    def diff(self) -> str:
        def lines(value: Any) -> list[str]:
            return json.dumps(value, indent=2, sort_keys=True, default=str).splitlines()

        return "\n".join(
            difflib.unified_diff(
                lines(self.recorded), lines(self.new), "recorded", "rerun", lineterm=""
            )
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "title": self.title,
            "same": self.same,
            "error": self.error,
            "recorded": self.recorded,
            "new": self.new,
        }


async def _item(connection: Connection, state: TaskState) -> Task | None:
    """The work item the role's handler saw, rebuilt from the stored message."""
    stored = await connection.streams.get(WORK_STREAM, state.stream_seq)
    if stored is None:
        return None
    try:
        message = codec.decode(stored.subject, stored.data, origin=stored.origin())
    except CodecError:
        return None
    if isinstance(message, Task):
        return message
    if isinstance(message, Handoff):
        return review_item(message)
    if isinstance(message, Escalation):
        found = await EscalationStore(connection).get(message.id)
        return escalation_item(message, found.record) if found is not None else None
    return None


async def work_item(connection: Connection, state: TaskState) -> Task | None:
    """The work item the role's handler saw for ``state``, rebuilt from its message."""
    return await _item(connection, state)


def context_for(
    role: RoleSpec,
    team: Team | None,
    state: TaskState,
    task: Task,
    contracts: dict[str, Any],
    *,
    calls: CallLog | None,
    extra: dict[str, Any] | None = None,
) -> HandlerContext:
    """The context the worker gave the handler for ``state`` (decisions, contracts,
    the previous failure, the generation of its recorded calls)."""
    return HandlerContext(
        role=role,
        subject=state.subject,
        attempt=state.attempt,
        decisions=[Decision.model_validate(d) for d in state.detail.get("decisions", [])],
        contracts=contracts,
        extra={"input": task.kind, **(extra or {})},
        team=team,
        previous_error=state.previous_error,
        generation=state.failures,
        calls=calls,
    )


async def rerun(
    connection: Connection,
    role: RoleSpec,
    handler: Handler,
    *,
    correlation: str | None = None,
    since: datetime | None = None,
    team: Team | None = None,
    live: bool = False,
    changed: bool = False,
    include_failed: bool = False,
) -> AsyncIterator[RerunResult]:
    """Each recorded input of ``role`` (optionally one flow, or since a time), run
    through ``handler`` with the context it had; nothing is published.

    Model calls are answered from their records, so a rerun costs nothing unless
    asked to: ``live`` calls the model for every call; ``changed`` (a changed model
    or prompt) calls it for the calls whose request differs from the recorded one
    and answers the others from their records. Nothing is recorded either way.
    ``include_failed``: dead and rejected inputs too."""
    registry = ContractRegistry(connection, team=team)
    calls = None if live else CallStore(connection, role=role.id, read_only=True)
    ends = {State.DEAD, State.REJECTED}
    states = [
        state
        for state in await all_states(connection)
        if state.role == role.id
        and (state.outcome is not None or (include_failed and state.state in ends))
        and (include_failed or state.state not in ends)
        and (correlation is None or correlation in (state.correlation_id, state.task_id))
        and (since is None or (state.created_at is not None and state.created_at >= since))
    ]
    for state in sorted(states, key=lambda s: (s.created_at or s.updated_at, s.task_id)):
        task = await _item(connection, state)
        if task is None:
            continue
        try:
            contracts = await registry.resolve(task.payload.get("contracts"))
        except RolebusError as error:
            yield RerunResult(
                task_id=state.task_id,
                title=state.title,
                recorded=state.outcome,
                new={},
                error=f"cannot rebuild its context: {error.message}",
            )
            continue
        context = context_for(
            role,
            team,
            state,
            task,
            contracts,
            calls=calls,
            extra={"rerun": True, "recorded_only": not (live or changed)},
        )
        recorded_usage = (state.outcome or {}).get("usage") or state.detail.get("usage")
        try:
            outcome = await handler(task, context)
        except NeedsLiveError as error:  # not a difference: nothing to compare
            yield RerunResult(
                task_id=state.task_id,
                title=state.title,
                recorded=state.outcome,
                new={},
                error=f"{error.message}: needs --live",
                recorded_usage=recorded_usage,
                recorded_state=state.state,
            )
            continue
        except Exception as error:  # report it like the worker would
            outcome = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        new = outcome.model_dump(mode="json", exclude_defaults=True)
        recorded = state.outcome
        # What a rerun paid is not part of the answer being compared.
        new_usage = new.pop("usage", None)
        recorded = {key: value for key, value in (recorded or {}).items() if key != "usage"}
        yield RerunResult(
            task_id=state.task_id,
            title=state.title,
            recorded=recorded,
            new=new,
            recorded_usage=recorded_usage,
            new_usage=new_usage,
            recorded_state=state.state,
        )
