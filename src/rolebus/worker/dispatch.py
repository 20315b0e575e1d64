"""What a worker does with each message it receives, top to bottom.

1. Decode it, and turn it into a lifecycle input: a task, a contract handoff to
   review or an escalation to decide is *delivered*; a decision *decides* the task
   parked behind it; a message that cannot run is *invalid*, an out-of-date one
   *stale*.
2. Read the task's record (a first delivery skips the read: its write is
   conditional on "no record yet" and fails if one exists after all).
3. :func:`~rolebus.flows.lifecycle.step` decides; the :class:`Executor` appends the
   record (one conditional write), publishes its outbox and acks.
4. When the step says *run*, the handler runs, and its answer (prepared by
   :class:`Answers`) is the next input; when it says *ask the boundary*, the role's
   ``never`` rule is prepared the same way.

Every rule is in :mod:`rolebus.flows.lifecycle`; this module only does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import structlog

from rolebus.errors import CodecError, RolebusError
from rolebus.flows.actions import AskBoundary, GrantBudget, Run, Transition
from rolebus.flows.budgets import BudgetLedger, TaskBudget
from rolebus.flows.calls import CallStore
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.effects import publish_effects, publish_event
from rolebus.flows.escalation import EscalationStore, climb, escalation_item, record_for
from rolebus.flows.escalation_records import EscalationRecord
from rolebus.flows.handoffs import review_item
from rolebus.flows.inputs import Cancelled, Decided, Delivered, GaveUp, Input, Invalid, Stale
from rolebus.flows.lifecycle import step
from rolebus.flows.limits import RateLimiter
from rolebus.flows.record import TaskState
from rolebus.flows.state import StateStore
from rolebus.handlers.base import BudgetBreachError, Handler, HandlerContext
from rolebus.nats.admin import StreamLimits
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.nats.publish import PendingPublish
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import PERSON, RoleSpec, Team
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Escalation, Event, Handoff, Outcome, Task, utc_now
from rolebus.wire.subjects import note_subject
from rolebus.worker.answers import Answers, Item
from rolebus.worker.executor import Delivery, DispatchStats, Executor, Record
from rolebus.worker.notices import ClaimedNotices
from rolebus.worker.progress import ProgressReporter

__all__ = ["DispatchStats", "Dispatcher"]

log = structlog.get_logger("rolebus.worker.loop")


class Dispatcher:
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
        self.notices = ClaimedNotices(claimed_after)
        self.role = role
        self.team = team
        self.handler = handler
        self.states = StateStore(connection)
        self.escalations = EscalationStore(connection, writer=role.id, team=team)
        self.contracts = ContractRegistry(connection, team=team)
        self.calls = CallStore(
            connection, role=role.id, max_age=calls_age or StreamLimits().max_age
        )
        self.budgets = BudgetLedger(connection, escalations=self._escalation)
        #: Tasks ``rolebus cancel`` asked to stop (task id -> reason), and the ones
        #: running now (task id -> the slot's asyncio task running its handler).
        self.cancelled: dict[str, str] = {}
        self._running: dict[str, asyncio.Task[Any]] = {}
        # Only roles that spend get a budget gate per task (none on the hot path).
        self._gated = role.budget.capped or isinstance(role.handler, LlmHandler)
        self.limiter = (
            RateLimiter(
                connection,
                model=role.handler.llm,
                base_url=role.handler.base_url,
                rpm=role.handler.rpm,
                tpm=role.handler.tpm,
                max_pause=role.handler.max_retry_after,
            )
            if isinstance(role.handler, LlmHandler) and (role.handler.rpm or role.handler.tpm)
            else None
        )
        self._log = log.bind(role=role.id)
        self.executor = Executor(connection, role, self.states, self._log)
        self.answers = Answers(role, team, self.escalations, self.contracts)

    @property
    def stats(self) -> DispatchStats:
        return self.executor.stats

    # --- entry -----------------------------------------------------------------------

    async def handle(self, message: InboundMessage) -> None:
        try:
            decoded = codec.decode(message.subject, message.data, origin=message.origin())
        except CodecError as error:
            reason = "invalid" if "not a valid" in error.message else "undecodable"
            await self._refuse(message, reason, error.message)
            return
        mismatch = codec.disagreement(message.subject, decoded)
        if mismatch is not None:
            why = f"refused: the body disagrees with the subject: {mismatch}"
            await self._refuse(message, "invalid", why)
        elif isinstance(decoded, Task):
            item = Item(task=decoded, kind="task", source=decoded)
            await self._deliver(message, item, boundary=True)
        elif isinstance(decoded, Handoff):
            review = review_item(decoded)
            await self._deliver(message, Item(task=review, kind=review.kind, source=decoded))
        elif isinstance(decoded, Escalation):
            await self._on_escalation(message, decoded)
        elif isinstance(decoded, Decision):
            await self._on_decision(message, decoded)
        else:
            await self._refuse(
                message, "invalid", f"{self.role.id} does not handle {message.subject}"
            )

    async def gave_up(self, original: StoredMessage, error: str, *, attempts: int) -> None:
        """The server gave up redelivering ``original`` (max deliveries): bury it."""
        task: Task | None = None
        with contextlib.suppress(CodecError):
            task = codec.decode_as(
                Task, original.data, subject=original.subject, origin=original.origin()
            )
        orphan = self._orphan(original.subject, original.seq, task)
        record = await self._read(orphan.task_id)
        given = GaveUp(
            orphan=orphan,
            reason="max-deliver",
            error=error,
            attempt=attempts,
            stream_seq=original.seq,
            now=utc_now(),
        )
        await self._drive(original, None, record, given)

    # --- the kinds of input ------------------------------------------------------------

    async def _deliver(
        self, message: InboundMessage, item: Item, *, boundary: bool = False
    ) -> None:
        task = item.task
        claim = TaskState(
            task_id=task.id,
            state="claimed",
            role=self.role.id,
            subject=message.subject,
            kind=task.kind,
            title=task.title,
            attempt=message.delivered,
            stream_seq=message.stream_seq,
            correlation_id=task.correlation_id,
            causation_id=task.causation_id,
            created_at=task.created_at,
            started_at=(now := utc_now()),
            updated_at=now,
        )
        # A first delivery is almost always a task never seen before: not even read.
        record = Record(None) if message.delivered == 1 else await self._read(task.id)
        given = Delivered(
            claim=claim,
            now=now,
            last_try=message.delivered >= self.role.max_deliver,
            boundary=self.role.never_rule_for(task.kind) if boundary else None,
            cancelled=self.cancelled.get(task.id),
        )
        await self._drive(message, item, record, given)

    async def _on_escalation(self, message: InboundMessage, escalation: Escalation) -> None:
        """An escalation to decide: checked against its own record (who asked, who
        holds it, at which level), then delivered like a task."""
        found = await self.escalations.get(escalation.id)
        if found is None:  # published by someone outside the bus: start its record now
            await self.escalations.open(record_for(escalation, kind="question"))
            found = await self.escalations.require(escalation.id)
        record = found.record
        if (escalation.from_role or PERSON) != record.asking_role:
            # A climbed copy comes from whoever passed it on (its subject's sender):
            # who asked is what the record's first step says.
            why = (
                f"refused: its from_role is {escalation.from_role!r} but escalation "
                f"{escalation.id} was asked by {record.asking_role}"
            )
            await self._refuse(message, "invalid", why)
            return
        if record.status != "open":
            await self._stale(message, f"escalation {escalation.id} is already {record.status}")
            return
        if escalation.level == record.level + 1 and escalation.to_role == self.role.id:
            # Sent one level up before its record said so (the supervisor records
            # the climb first; an older one did not): record it the same way.
            climbed = await climb(self.escalations, self.team, escalation)
            if climbed is None:
                await self._stale(message, f"escalation {escalation.id} changed meanwhile")
                return
            record, effects = climbed
            trace = message.headers.get(Header.TRACEPARENT)
            await publish_effects(self.connection, effects, trace=trace)
        elif escalation.level != record.level or record.holder != self.role.id:
            held = f"held by {record.holder} at level {record.level}"
            await self._stale(message, f"escalation {escalation.id} is {held}")
            return
        task = escalation_item(escalation, record)
        await self._deliver(message, Item(task=task, kind="escalation", source=escalation))

    async def _on_decision(self, message: InboundMessage, decision: Decision) -> None:
        """A decision resumes the task parked behind its escalation. What was decided,
        and by whom, is what the escalation's record says (its steps are attributed to
        their writers), not what the message's body says."""
        found = await self.escalations.get(decision.escalation_id)
        if found is None or found.record.task_id is None:
            why = f"decision for unknown escalation {decision.escalation_id!r}"
            await self._refuse(message, "invalid", why)
            return
        escalation = found.record
        if escalation.status != "decided":
            why = f"escalation {escalation.id} is not decided: a decision message alone is not"
            await self._stale(message, why)
            return
        decision = decision.model_copy(
            update={
                "decision": escalation.decision or decision.decision,
                "approved": escalation.approved,
                "decided_by": escalation.decided_by or decision.decided_by,
            }
        )
        record = await self._read(escalation.task_id or "")
        item = None
        if record.state is not None and record.state.source is not None:
            # The parked item is rebuilt from the message that started it (a task, or
            # a contract to review; its record keeps it), so finishing it has the
            # same effects.
            kept = record.state.source
            source = codec.decode(str(kept["subject"]), codec.encode_map(kept["message"]))
            if isinstance(source, Handoff):
                review = review_item(source)
                item = Item(task=review, kind=review.kind, source=source)
            elif isinstance(source, Task):
                item = Item(task=source, kind="task", source=source)
            else:
                why = f"{kept['subject']} cannot be resumed by a decision"
                await self._refuse(message, "invalid", why)
                return
        given = Decided(
            escalation_id=escalation.id,
            approval=escalation.kind == "approval",
            approved=decision.approved,
            decided_by=decision.decided_by,
            text=decision.decision,
            # The escalation's reason, from its record, goes with the decision: a
            # handler resumed by an approval can tell which approval it was.
            decision={**decision.model_dump(mode="json"), "reason": escalation.reason},
            reason=escalation.reason,
            orphan=self._orphan(message.subject, message.stream_seq, None),
            now=utc_now(),
            attempt=message.delivered,
            last_try=message.delivered >= self.role.max_deliver,
            cancelled=self.cancelled.get(escalation.task_id or ""),
        )
        await self._drive(message, item, record, given)

    async def _refuse(self, message: InboundMessage, reason: str, error: str) -> None:
        """A message that cannot run: dead-lettered, named after its place in the work
        stream (it never became a task this role knows)."""
        orphan = self._orphan(message.subject, message.stream_seq, None)
        given = Invalid(
            orphan=orphan,
            reason=reason,
            error=error,
            attempt=message.delivered,
            stream_seq=message.stream_seq,
            now=utc_now(),
        )
        await self._drive(message, None, await self._read(orphan.task_id), given)

    async def _stale(self, message: InboundMessage, why: str) -> None:
        await self._drive(message, None, Record(None), Stale(why=why))

    # --- the loop: step, act, and run the handler when the step says so ----------------

    async def _drive(
        self, delivery: Delivery, item: Item | None, record: Record, given: Input
    ) -> None:
        async def before(transition: Transition, known: Record) -> None:
            for action in transition.before:
                if isinstance(action, GrantBudget):
                    await self._grant(action, transition)
                else:
                    await self.executor.do(action, delivery, known)

        while True:
            transition = step(record.state, given)
            record, transition = await self.executor.commit(
                delivery, record, transition, given, before
            )
            following: Input | None = None
            for action in transition.after:
                if isinstance(action, Run):
                    assert item is not None
                    assert isinstance(delivery, InboundMessage)
                    following = await self._run(delivery, item, record)
                elif isinstance(action, AskBoundary):
                    assert item is not None
                    assert record.state is not None
                    attempt = record.state.attempt
                    following = await self.answers.boundary(
                        item, record.state, action.rule, attempt=attempt, now=utc_now()
                    )
                else:
                    await self.executor.do(action, delivery, record)
            if following is None:
                return
            given = following

    async def _read(self, task_id: str) -> Record:
        found = await self.states.get(task_id, role=self.role.id)
        return Record(None) if found is None else Record(found.state, found.revision)

    def _orphan(self, subject: str, stream_seq: int, task: Task | None) -> TaskState:
        """The record of something that never ran as a task of this role."""
        return TaskState(
            task_id=task.id if task is not None else f"seq-{stream_seq}",
            state="claimed",
            role=self.role.id,
            subject=subject,
            kind=task.kind if task is not None else "",
            title=task.title if task is not None else "",
            stream_seq=stream_seq,
            correlation_id=task.correlation_id if task is not None else None,
            causation_id=task.causation_id if task is not None else None,
            created_at=task.created_at if task is not None else None,
        )

    async def _grant(self, action: GrantBudget, transition: Transition) -> None:
        assert transition.record is not None
        task_id = transition.record.task_id
        await self.budgets.approve(self.role, task_id, escalation_id=action.escalation_id)

    async def _escalation(self, escalation_id: str) -> EscalationRecord | None:
        found = await self.escalations.get(escalation_id)
        return None if found is None else found.record

    # --- running the handler -------------------------------------------------------------

    def cancel_requested(self, task_id: str, reason: str) -> None:
        """``rolebus cancel`` asked: skip the task when it comes, stop it if it runs."""
        self.cancelled[task_id] = reason
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def _run(self, message: InboundMessage, item: Item, record: Record) -> Input:
        """Run the handler; its answer as the next input."""
        state = record.state
        assert state is not None
        trace = message.headers.get(Header.TRACEPARENT)

        def publish_claimed() -> Awaitable[PendingPublish]:
            subject, event = self._claimed_note(item, message)
            return publish_event(self.connection, event, trace=trace, subject=subject)

        self.notices.begin(message, publish_claimed)
        outcome: Outcome | None
        breach: BudgetBreachError | None = None
        try:
            context = HandlerContext(
                role=self.role,
                subject=state.subject,
                attempt=message.delivered,
                decisions=[Decision.model_validate(d) for d in state.detail.get("decisions", [])],
                contracts=await self.contracts.resolve(item.task.payload.get("contracts")),
                extra={"input": item.kind},
                team=self.team,
                previous_error=state.previous_error,
                generation=state.failures,
                calls=self.calls,
                budget=TaskBudget(
                    self.budgets,
                    self.role,
                    item.task.id,
                    flow_tokens=self.answers.brakes.tokens_for(item.task),
                    flow_usd=self.answers.brakes.usd_for(item.task),
                )
                if self._gated
                else None,
                progress_sink=ProgressReporter(self.connection, self.role.id, item.task, message),
                limiter=self.limiter,
            )
            if (running := asyncio.current_task()) is not None:
                self._running[item.task.id] = running
            outcome = await self.handler(item.task, context)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if item.task.id not in self.cancelled or current is None or current.uncancel():
                raise  # the worker stops: not a cancel request
            outcome = None
        except BudgetBreachError as error:  # the bus's own gate: it asks, with its amounts
            breach, outcome = error, None
        except RolebusError as error:
            outcome = Outcome.failed(error.message, retryable=False)
        except Exception as error:  # a handler's bug is a retryable failure, not ours
            self._log.warning("handler raised", task_id=item.task.id, error=repr(error))
            outcome = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        finally:
            self._running.pop(item.task.id, None)
        await self.notices.end(message)
        now, attempt = utc_now(), message.delivered
        if breach is not None:
            return await self.answers.breach(item, state, breach, attempt=attempt, now=now)
        if outcome is None:  # stopped by `rolebus cancel`
            why = f"cancelled: {self.cancelled.get(item.task.id, '')}"
            return Cancelled(now=now, attempt=attempt, subject=state.subject, error=why)
        return await self.answers.of(item, state, outcome, attempt=attempt, now=now)

    def _claimed_note(self, item: Item, message: InboundMessage) -> tuple[str, Event]:
        """A note that this attempt runs (for a watcher), and where it goes."""
        task = item.task
        number = f"{message.stream_seq}-{message.delivered}"
        return note_subject("claimed", self.role.id, task.id, number), Event(
            id=f"{task.id}_claimed_{message.stream_seq}_{message.delivered}",
            state="claimed",
            task_id=task.id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=task.flow_id,
            causation_id=task.id,
            detail={"input": item.kind, "title": task.title},
        )
