"""Carrying out what the lifecycle decided: the one place a task's record is appended,
its outbox published, its delivery acked or naked and its message dead-lettered.

No rule lives here (they are :mod:`rolebus.flows.lifecycle`'s): a lost
compare-and-set is answered by reading the record again and stepping again with the
same input, so what a newer record means is decided by the table too.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rolebus.errors import RolebusError, StaleClaimError
from rolebus.flows import dlq
from rolebus.flows.actions import (
    Ack,
    Action,
    DeadLetter,
    Ignore,
    KeepLastTry,
    Nak,
    Publish,
    Restart,
    Transition,
)
from rolebus.flows.effects import publish_effects, publish_event
from rolebus.flows.inputs import Input
from rolebus.flows.lifecycle import step
from rolebus.flows.record import PARKED, TERMINAL_STATES, TaskState
from rolebus.flows.state import StateStore, StoredState
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.team.roles import RoleSpec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event
from rolebus.wire.subjects import WORK_STREAM, last_try_subject

__all__ = ["Delivery", "DispatchStats", "Executor", "Record"]

#: What is being settled: a delivery (acked or naked when done), or a stored message
#: the server gave up on (nothing to ack).
Delivery = InboundMessage | StoredMessage

#: What a written record is logged as, where it is not ``task <state>``.
_EVENTS = {"retrying": "task failed; will retry", PARKED: "task escalated"}
#: The rules after which a record's outbox may share an atomic batch (a first run's
#: messages are new ids; one stored already would refuse a whole batch).
_BATCHED_RULES = frozenset({"end", "cancel", "reject"})


@dataclass
class DispatchStats:
    completed: int = 0
    failed: int = 0
    dead: int = 0
    parked: int = 0
    redelivered_done: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Record:
    """The task's newest record as this delivery knows it (None: none yet) and the
    compare-and-set's revision (0: none)."""

    state: TaskState | None
    revision: int = 0


class Executor:
    """Does a transition's actions for one role's worker."""

    def __init__(
        self,
        connection: Connection,
        role: RoleSpec,
        states: StateStore,
        log: Any,  # a structlog logger bound to the role
    ) -> None:
        self.connection = connection
        self.role = role
        self.states = states
        self.stats = DispatchStats()
        self.log = log

    def has_backlog(self, delivery: Delivery) -> bool:
        """More messages wait on the server than the worker holds: it is saturated,
        and its records and effects share atomic batches (one fsync for many;
        bench/README has the gain). A worker keeping up sends them alone: a batch
        is slow to start, and bursts at a steady rate must not pay that."""
        return isinstance(delivery, InboundMessage) and (
            delivery.pending >= 2 * self.role.concurrency
        )

    async def commit(
        self,
        delivery: Delivery,
        record: Record,
        transition: Transition,
        given: Input,
        before: Callable[[Transition, Record], Awaitable[None]],
    ) -> tuple[Record, Transition]:
        """Do the transition's ``before`` actions, then append its record if nothing
        was written since ``record`` was read; when something was, read the newest
        and step again with ``given`` (its own ``before`` actions first: they are
        idempotent, so one the first transition did already changes nothing).
        Returns the record as stored and the transition that was carried out."""
        if transition.before:
            await before(transition, record)
        batch = transition.rule in _BATCHED_RULES and self.has_backlog(delivery)
        while transition.write and transition.record is not None:
            written = await self.states.append(transition.record, record.revision, batch=batch)
            if written is not None:
                self._count(transition)
                return Record(written.state, written.revision), transition
            fresh = await self.states.get(transition.record.task_id, role=self.role.id)
            if (fresh.revision if fresh is not None else 0) == record.revision:
                raise StaleClaimError(
                    f"the record of task {transition.record.task_id} was refused, yet no "
                    "newer one exists",
                    hint="another writer may be using this role's record subjects",
                )
            record = Record(None) if fresh is None else Record(fresh.state, fresh.revision)
            transition = step(record.state, given)
            if transition.before:
                await before(transition, record)
            batch = False
        if transition.rule == "again":
            self.stats.redelivered_done += 1
        return Record(transition.record, record.revision), transition

    async def do(self, action: Action, delivery: Delivery, record: Record) -> None:
        """One action that needs nothing but the delivery and the record."""
        if isinstance(action, Publish):
            await self._publish(delivery, record)
        elif isinstance(action, Ack):
            if isinstance(delivery, InboundMessage):
                await delivery.ack()
        elif isinstance(action, Nak):
            if isinstance(delivery, InboundMessage):
                await delivery.nak(delay=action.delay)
        elif isinstance(action, DeadLetter):
            await self._dead_letter(delivery, action)
        elif isinstance(action, KeepLastTry):
            await self._keep_last_try(delivery, action.task_id)
        elif isinstance(action, Ignore):
            self.log.info("stale message ignored", subject=delivery.subject, why=action.why)
        elif isinstance(action, Restart):
            raise StaleClaimError(action.why)
        else:  # Run, AskBoundary, GrantBudget: the dispatcher's
            raise TypeError(f"the executor does not do {action!r}")

    async def _publish(self, delivery: Delivery, record: Record) -> None:
        """Publish the record's outbox. If it cannot all be stored (a full stream),
        the record says so before the error goes on (the delivery is retried): a
        task must not look done while its follow-ups do not exist. Only that case
        costs a write; the redelivery that stores them clears it."""
        state = record.state
        if state is None or not state.effects:
            return
        stored = StoredState(state, record.revision)
        try:
            await publish_effects(
                self.connection,
                state.effects,
                trace=delivery.headers.get(Header.TRACEPARENT),
                batch=state.state in TERMINAL_STATES and self.has_backlog(delivery),
            )
        except RolebusError as error:
            if state.effects_pending != error.message:
                detail = {**state.detail, "effects_pending": error.message}
                await self.states.change(stored, detail=detail)
            raise
        if state.effects_pending:
            # Kept as None, not dropped: the record was counted as completed once.
            await self.states.change(stored, detail={**state.detail, "effects_pending": None})

    async def _dead_letter(self, delivery: Delivery, action: DeadLetter) -> None:
        """The one dead-letter path: the message goes to ``dlq.>`` with the reason
        (for the worker's own give-ups and for the server's)."""
        original = delivery if isinstance(delivery, StoredMessage) else delivery.stored(WORK_STREAM)
        await dlq.dead_letter(
            self.connection,
            subject=original.subject,
            data=original.data,
            headers=original.headers,
            stream_seq=original.seq,
            reason=action.reason,
            error=action.error,
            role=self.role.id,
            attempts=action.attempts,
        )

    async def _keep_last_try(self, delivery: Delivery, task_id: str) -> None:
        """Before the last attempt the server allows, a note keeps the message: if
        this attempt dies too, the server's max-deliveries advisory names only its
        sequence, and a role may not read the work stream by sequence (that would
        let it read any role's work). The worker that buries it reads this note."""
        if not isinstance(delivery, InboundMessage):
            return
        note = Event(
            id=f"{task_id}_last-try_{delivery.stream_seq}",
            state="last-try",
            task_id=task_id,
            role=self.role.id,
            subject=delivery.subject,
            attempt=delivery.delivered,
            detail={
                "stream_seq": delivery.stream_seq,
                "time_ns": delivery.time_ns,
                "data": base64.b64encode(delivery.data).decode(),
                "headers": dict(delivery.headers),
            },
        )
        subject = last_try_subject(self.role.id, task_id, delivery.stream_seq)
        trace = delivery.headers.get(Header.TRACEPARENT)
        await (await publish_event(self.connection, note, trace=trace, subject=subject)).result()

    def _count(self, transition: Transition) -> None:
        """Counts and one log line per written record (the common case at debug: a
        line per task is a cost on the hot path, and a flood)."""
        state = transition.record
        assert state is not None
        name = state.state
        if name == "completed":
            self.stats.completed += 1
            self.stats.by_state[name] = self.stats.by_state.get(name, 0) + 1
            self.log.debug("task completed", task_id=state.task_id, attempt=state.attempt)
            return
        if name in TERMINAL_STATES and name != "dead":
            self.stats.by_state[name] = self.stats.by_state.get(name, 0) + 1
        elif name == "retrying":
            self.stats.failed += 1
        elif name == PARKED:
            self.stats.parked += 1
        elif name == "dead":
            self.stats.dead += 1
        self.log.info(
            _EVENTS.get(name, f"task {name}"),
            task_id=state.task_id,
            subject=state.subject,
            attempt=state.attempt,
            rule=transition.rule,
            error=state.error,
            escalated_to=state.detail.get("escalated_to"),
        )
