"""Carrying out what was decided: the one place a task's record is appended, its
outbox published, its delivery acked or naked, its message dead-lettered, and the
writes a decision asked for first (escalations, contract versions) are made.

No rule lives here (they are :mod:`rolebus.flows`'): a lost compare-and-set is
answered by reading the record again and stepping again with the same input, so
what a newer record means is decided by the table too. An action that cannot be
finished gives the delivery back (:class:`~rolebus.errors.RetryLaterError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rolebus.errors import RetryLaterError, RolebusError, StaleClaimError
from rolebus.flows import dlq, last_try
from rolebus.flows.actions import (
    Ack,
    Action,
    DeadLetter,
    GiveBack,
    GrantBudget,
    Ignore,
    KeepLastTry,
    Nak,
    Publish,
    Transition,
)
from rolebus.flows.budgets import BudgetLedger
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.effects import publish_effects
from rolebus.flows.escalation_store import EscalationStore
from rolebus.flows.inputs import Input, OutboxStored, OutboxStuck
from rolebus.flows.lifecycle import step
from rolebus.flows.preparations import (
    ClimbEscalation,
    DecideEscalation,
    OpenEscalation,
    Preparation,
    PublishContract,
)
from rolebus.flows.record import Record, State
from rolebus.flows.state import StateStore
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.team.roles import RoleSpec
from rolebus.wire.headers import Header
from rolebus.wire.messages import utc_now
from rolebus.wire.subjects import WORK_STREAM

__all__ = ["Delivery", "DispatchStats", "Executor"]

#: What is being settled: a delivery (acked or naked when done), or a stored message
#: the server gave up on (nothing to ack).
Delivery = InboundMessage | StoredMessage

#: What a written record is logged as, where it is not ``task <state>``.
_EVENTS: dict[str, str] = {
    State.RETRYING: "task failed; will retry",
    State.PARKED: "task escalated",
}


@dataclass
class DispatchStats:
    completed: int = 0
    failed: int = 0
    dead: int = 0
    parked: int = 0
    redelivered_done: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Stores:
    """The stores a role's worker writes."""

    states: StateStore
    escalations: EscalationStore
    contracts: ContractRegistry
    budgets: BudgetLedger


class Executor:
    """Does the actions and preparations for one role's worker."""

    def __init__(
        self,
        connection: Connection,
        role: RoleSpec,
        stores: Stores,
        log: Any,  # a structlog logger bound to the role
    ) -> None:
        self.connection = connection
        self.role = role
        self.stores = stores
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

    # --- a transition ---------------------------------------------------------------

    async def commit(
        self, delivery: Delivery, record: Record, transition: Transition, given: Input
    ) -> tuple[Record, Transition]:
        """Do the transition's ``before`` actions, then append its record if nothing
        was written since ``record`` was read; when something was, read the newest
        and step again with ``given`` (its own ``before`` actions first: they are
        idempotent, so one the first transition did already changes nothing).
        Returns the record as stored and the transition that was carried out."""
        await self._before(transition, delivery, record)
        batch = transition.shares_batch and self.has_backlog(delivery)
        while transition.write and transition.record is not None:
            states = self.stores.states
            written = await states.append(transition.record, record.revision, batch=batch)
            if written is not None:
                self._count(transition)
                return Record(written.state, written.revision), transition
            fresh = await states.get(transition.record.task_id, role=self.role.id)
            if (fresh.revision if fresh is not None else 0) == record.revision:
                raise StaleClaimError(
                    f"the record of task {transition.record.task_id} was refused, yet no "
                    "newer one exists",
                    hint="another writer may be using this role's record subjects",
                )
            record = Record(None) if fresh is None else Record(fresh.state, fresh.revision)
            transition = step(record.state, given)
            await self._before(transition, delivery, record)
            batch = False
        return Record(transition.record, record.revision), transition

    async def _before(self, transition: Transition, delivery: Delivery, record: Record) -> None:
        for action in transition.before:
            await self.do(action, delivery, record)

    async def do(self, action: Action, delivery: Delivery, record: Record) -> Input | None:
        """One action; an input when its outcome is one the lifecycle must decide on
        (an outbox that could not be stored, or that is stored now)."""
        if isinstance(action, Publish):
            return await self._publish(action, delivery, record)
        if isinstance(action, Ack):
            if isinstance(delivery, InboundMessage):
                await delivery.ack()
        elif isinstance(action, Nak):
            if isinstance(delivery, InboundMessage):
                await delivery.nak(delay=action.delay)
        elif isinstance(action, DeadLetter):
            await self._dead_letter(delivery, action)
        elif isinstance(action, KeepLastTry):
            if isinstance(delivery, InboundMessage):
                await last_try.keep(self.connection, self.role.id, action.task_id, delivery)
        elif isinstance(action, GrantBudget):
            # The record is the one its decision resumes: its task's allowance grows.
            task_id = record.state.task_id if record.state is not None else ""
            await self.stores.budgets.approve(
                self.role, task_id, escalation_id=action.escalation_id
            )
        elif isinstance(action, Ignore):
            self.log.info("stale message ignored", subject=delivery.subject, why=action.why)
        elif isinstance(action, GiveBack):
            raise RetryLaterError(action.why)
        else:  # Run, AskBoundary: the shell's
            raise TypeError(f"the executor does not do {action!r}")
        return None

    async def _publish(self, action: Publish, delivery: Delivery, record: Record) -> Input | None:
        """Publish the record's outbox. If it cannot all be stored (a full stream),
        the lifecycle hears of it (the record must say so before the delivery comes
        again); only that case costs a write, and the redelivery that stores them
        clears it."""
        if action.again:
            self.stats.redelivered_done += 1
        state = record.state
        if state is None or not state.effects:
            return None
        try:
            await publish_effects(
                self.connection,
                state.effects,
                trace=delivery.headers.get(Header.TRACEPARENT),
                batch=action.shares_batch and self.has_backlog(delivery),
            )
        except RolebusError as error:
            return OutboxStuck(error=error.message, now=utc_now())
        return OutboxStored(now=utc_now()) if state.effects_pending else None

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

    # --- what a decision writes first -----------------------------------------------

    async def prepare(self, preparations: tuple[Preparation, ...], delivery: Delivery) -> bool:
        """Make the writes, in order; False as soon as one finds another writer came
        first (read the facts again, and decide again)."""
        for preparation in preparations:
            if not await self._prepare(preparation, delivery):
                return False
        return True

    async def _prepare(self, preparation: Preparation, delivery: Delivery) -> bool:
        escalations = self.stores.escalations
        if isinstance(preparation, OpenEscalation):
            return await escalations.write_open(preparation.record) is not None
        if isinstance(preparation, ClimbEscalation):
            if await escalations.write_step(preparation.stored, preparation.climbed) is None:
                return False
            if preparation.publish:
                trace = delivery.headers.get(Header.TRACEPARENT)
                await publish_effects(self.connection, list(preparation.publish), trace=trace)
            return True
        if isinstance(preparation, DecideEscalation):
            return await escalations.write_step(preparation.stored, preparation.decided) is not None
        if isinstance(preparation, PublishContract):
            return await self.stores.contracts.create(preparation.version)
        await self.stores.contracts.put_answer(
            preparation.contract,
            preparation.version,
            role=preparation.role,
            accepted=preparation.accepted,
            reasons=list(preparation.reasons),
        )
        return True

    def _count(self, transition: Transition) -> None:
        """Counts and one log line per written record (the common case at debug: a
        line per task is a cost on the hot path, and a flood)."""
        state = transition.record
        assert state is not None
        name = state.state
        if name == State.COMPLETED:
            self.stats.completed += 1
            self.stats.by_state[name] = self.stats.by_state.get(name, 0) + 1
            self.log.debug("task completed", task_id=state.task_id, attempt=state.attempt)
            return
        if name == State.DEAD:
            self.stats.dead += 1
        elif state.terminal:
            self.stats.by_state[name] = self.stats.by_state.get(name, 0) + 1
        elif name == State.RETRYING:
            self.stats.failed += 1
        elif name == State.PARKED:
            self.stats.parked += 1
        self.log.info(
            _EVENTS.get(name, f"task {name}"),
            task_id=state.task_id,
            subject=state.subject,
            attempt=state.attempt,
            rule=transition.rule,
            error=state.error,
            escalated_to=state.detail.get("escalated_to"),
        )
