"""What a worker does with each message it receives: load, decide, act.

1. **Load** the facts a decision asks for: the task's record, the escalation's, the
   contract versions (a first delivery reads nothing: its write is conditional on
   "no record yet").
2. **Decide**, purely: :func:`~rolebus.flows.intake.intake` turns what arrived into
   a lifecycle input, :func:`~rolebus.flows.lifecycle.step` decides what it does to
   the task, :func:`~rolebus.flows.answers.answer` what a handler's answer is.
3. **Act**: the :class:`~rolebus.worker.executor.Executor` makes the writes a
   decision needs first, appends the record (one conditional write), publishes its
   outbox and acks. When the step says *run*, the handler's attempt runs
   (:mod:`rolebus.worker.attempt`) and its answer is the next input.

A delivery's path reads top to bottom: the shell calls down into flows/ and the
executor, which return; nothing calls back into the shell.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import structlog

from rolebus.errors import CodecError, StaleClaimError
from rolebus.flows.actions import AskBoundary, Run
from rolebus.flows.answers import answer, boundary
from rolebus.flows.budgets import BudgetLedger
from rolebus.flows.calls import CallStore
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.escalation_record import EscalationRecord
from rolebus.flows.escalation_store import EscalationStore
from rolebus.flows.facts import Facts, Needs
from rolebus.flows.inputs import Input
from rolebus.flows.intake import Intake, Item, Received, gave_up, intake
from rolebus.flows.lifecycle import step
from rolebus.flows.preparations import Prepared
from rolebus.flows.record import Record
from rolebus.flows.state import StateStore
from rolebus.handlers.base import Handler
from rolebus.nats.admin import StreamLimits
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.team.roles import NeverRule, RoleSpec, Team
from rolebus.wire import codec
from rolebus.wire.messages import Envelope, Task, utc_now
from rolebus.worker.attempt import Attempts
from rolebus.worker.executor import Delivery, DispatchStats, Executor, Stores

__all__ = ["DispatchStats", "Shell"]

log = structlog.get_logger("rolebus.worker.loop")

#: How many times one decision may read again (facts it lacked, or writes another
#: writer came first to) before the delivery is given back.
_ROUNDS = 16

DecisionT = TypeVar("DecisionT", Intake, Prepared)


class Shell:
    """Handles one delivery at a time (the worker runs several concurrently)."""

    def __init__(
        self,
        connection: Connection,
        role: RoleSpec,
        team: Team,
        handler: Handler,
        *,
        claimed_after: float = 0.25,
        calls_age: float | None = None,
    ):
        self.connection = connection
        self.role = role
        self.team = team
        self._log = log.bind(role=role.id)
        stores = Stores(
            states=StateStore(connection),
            escalations=EscalationStore(connection, writer=role.id, team=team),
            contracts=ContractRegistry(connection, team=team),
            budgets=BudgetLedger(connection, escalations=self._escalation),
        )
        self.stores = stores
        self.executor = Executor(connection, role, stores, self._log)
        self.attempts = Attempts(
            connection,
            role,
            team,
            handler,
            calls=CallStore(connection, role=role.id, max_age=calls_age or StreamLimits().max_age),
            budgets=stores.budgets,
            contracts=stores.contracts,
            claimed_after=claimed_after,
        )

    @property
    def stats(self) -> DispatchStats:
        return self.executor.stats

    def cancel_requested(self, task_id: str, reason: str) -> None:
        self.attempts.cancel_requested(task_id, reason)

    # --- entries -----------------------------------------------------------------------

    async def handle(self, message: InboundMessage) -> None:
        """One delivery, from its decoding to its ack (or nak)."""
        try:
            decoded: Envelope | CodecError = codec.decode(
                message.subject, message.data, origin=message.origin()
            )
        except CodecError as error:
            decoded = error
        received = Received(message.subject, message.stream_seq, message.delivered, decoded)
        now = utc_now()
        taken = await self._decide(
            lambda facts: intake(
                received,
                facts,
                role=self.role,
                team=self.team,
                cancelled=self.attempts.cancelled,
                now=now,
            ),
            message,
        )
        await self._drive(message, taken)

    async def gave_up(self, original: StoredMessage, error: str, *, attempts: int) -> None:
        """The server gave up redelivering ``original`` (max deliveries): bury it."""
        task: Task | None = None
        with contextlib.suppress(CodecError):
            task = codec.decode_as(
                Task, original.data, subject=original.subject, origin=original.origin()
            )
        now = utc_now()
        taken = await self._decide(
            lambda facts: gave_up(
                original.subject,
                original.seq,
                task,
                error=error,
                attempts=attempts,
                facts=facts,
                role=self.role,
                now=now,
            ),
            original,
        )
        await self._drive(original, taken)

    # --- step, act, and run the handler when the step says so ----------------------------

    async def _drive(self, delivery: Delivery, taken: Intake) -> None:
        record, item = taken.record, taken.item
        given: Input | None = taken.given
        while given is not None:
            transition = step(record.state, given)
            record, transition = await self.executor.commit(delivery, record, transition, given)
            given = None
            for action in transition.after:
                if isinstance(action, Run | AskBoundary):
                    given = await self._handle(action, delivery, item, record)
                else:
                    given = await self.executor.do(action, delivery, record)
                if given is not None:
                    break  # the next input decides what follows

    async def _handle(
        self, action: Run | AskBoundary, delivery: Delivery, item: Item | None, record: Record
    ) -> Input:
        """Run the handler (or ask the role's boundary): its answer, as the next input."""
        state = record.state
        if item is None or state is None or not isinstance(delivery, InboundMessage):
            raise StaleClaimError(f"nothing to run for {delivery.subject}")  # a bug, retried
        if isinstance(action, AskBoundary):
            rule: NeverRule = action.rule
            now = utc_now()
            prepared = await self._decide(
                lambda facts: boundary(
                    item, state, rule, facts, role=self.role, team=self.team, now=now
                ),
                delivery,
            )
            return prepared.given
        answered = await self.attempts.run(delivery, item, state)
        now, attempt = utc_now(), delivery.delivered
        prepared = await self._decide(
            lambda facts: answer(
                answered,
                item,
                state,
                facts,
                role=self.role,
                team=self.team,
                attempt=attempt,
                now=now,
            ),
            delivery,
        )
        return prepared.given

    # --- load: the facts a decision asks for --------------------------------------------

    async def _decide(
        self, decide: Callable[[Facts], DecisionT | Needs], delivery: Delivery
    ) -> DecisionT:
        """Ask ``decide`` until it has the facts it needs and its writes are made."""
        facts = Facts()
        for _ in range(_ROUNDS):
            decided = decide(facts)
            if isinstance(decided, Needs):
                facts = await self._read(decided, facts)
            elif await self.executor.prepare(decided.preparations, delivery):
                return decided
            else:  # another writer came first: read everything again
                facts = await self._read(
                    Needs(
                        records=frozenset(facts.records),
                        escalations=frozenset(facts.escalations),
                        contracts=frozenset(facts.contracts),
                    ),
                    Facts(),
                )
        raise StaleClaimError(f"the records {delivery.subject} needs kept changing; retrying")

    async def _read(self, needs: Needs, facts: Facts) -> Facts:
        states, stores = self.stores.states, self.stores
        records, escalations, contracts = {}, {}, {}
        for task_id in needs.records:
            found = await states.get(task_id, role=self.role.id)
            records[task_id] = (
                Record(None) if found is None else Record(found.state, found.revision)
            )
        for escalation_id in needs.escalations:
            escalations[escalation_id] = await stores.escalations.get(escalation_id)
        for name in needs.contracts:
            contracts[name] = tuple(await stores.contracts.versions(name))
        return facts.adding(records=records, escalations=escalations, contracts=contracts)

    async def _escalation(self, escalation_id: str) -> EscalationRecord | None:
        found = await self.stores.escalations.get(escalation_id)
        return None if found is None else found.record
