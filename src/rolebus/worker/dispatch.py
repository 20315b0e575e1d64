"""What a worker does with each message it receives.

Every message addressed to a role becomes a *work item* (a :class:`Task`) that
its handler sees: a task as it is; a contract handoff to review; the answer to a
handoff this role sent; an escalation to decide; a decision that resumes a
parked task. The handler's :class:`Outcome` becomes effects (follow-ups,
handoffs, escalations, decisions, events), recorded in the item's state record
before they are published, and only then is the message acked.

The role's boundaries (``never`` rules) apply before a task's handler runs: an
``approval`` rule parks the task until the named role approves, ``handoff``
gives the task to another role, ``refuse`` rejects it.

This module routes the inputs and runs the handler; how a delivery ends (state
record, effects, ack) is :mod:`rolebus.worker.settle`, and the outcomes that wait for
someone (escalations, boundaries) are :mod:`rolebus.worker.parking`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import structlog

from rolebus.errors import CodecError, RolebusError, RoleError
from rolebus.flows.budgets import BudgetLedger, TaskBudget
from rolebus.flows.calls import CallStore
from rolebus.flows.cancels import CANCELLED
from rolebus.flows.contracts import ContractError, ContractRegistry
from rolebus.flows.effects import (
    follow_up_tasks,
    publish_effects,
    publish_event,
)
from rolebus.flows.escalation import (
    EscalationStore,
    climb,
    escalation_item,
    record_for,
)
from rolebus.flows.handoffs import offer_effects, review_item
from rolebus.flows.limits import RateLimiter
from rolebus.flows.state import RESUMED, StateStore, StoredState
from rolebus.handlers.base import Handler, HandlerContext
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage
from rolebus.nats.publish import PendingPublish
from rolebus.team.budget import BUDGET_REASON
from rolebus.team.roles import PERSON, LlmHandler, RoleSpec, Team
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import (
    Decision,
    Escalation,
    Handoff,
    Outcome,
    Task,
)
from rolebus.worker.notices import ClaimedNotices
from rolebus.worker.parking import Parking
from rolebus.worker.progress import ProgressReporter
from rolebus.worker.settle import DispatchStats, Item, Settling

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
    ):
        self.connection = connection
        self.notices = ClaimedNotices(claimed_after)
        self.role = role
        self.team = team
        self.handler = handler
        self.states = StateStore(connection)
        self.escalations = EscalationStore(connection, writer=role.id, team=team)
        self.contracts = ContractRegistry(connection, team=team)
        self.calls = CallStore(connection, role=role.id)
        self.budgets = BudgetLedger(connection)
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
            )
            if isinstance(role.handler, LlmHandler) and (role.handler.rpm or role.handler.tpm)
            else None
        )
        self.stats = DispatchStats()
        self._log = log.bind(role=role.id)
        self.settle = Settling(connection, role, self.states, self.stats, self._log)
        self.parking = Parking(self.settle, team, self.escalations, self.contracts)

    # --- entry -----------------------------------------------------------------------

    async def handle(self, message: InboundMessage) -> None:
        try:
            decoded = codec.decode(message.subject, message.data, origin=message.origin())
        except CodecError as error:
            reason = "invalid" if "not a valid" in error.message else "undecodable"
            await self.settle.dead_letter(message, reason=reason, error=error.message)
            return
        mismatch = codec.disagreement(message.subject, decoded)
        if mismatch is not None:
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"refused: the body disagrees with the subject: {mismatch}",
            )
            return
        if isinstance(decoded, Task):
            await self._on_task(message, decoded)
        elif isinstance(decoded, Handoff):
            await self._on_handoff(message, decoded)
        elif isinstance(decoded, Escalation):
            await self._on_escalation(message, decoded)
        elif isinstance(decoded, Decision):
            await self._on_decision(message, decoded)
        else:
            await self.settle.dead_letter(
                message, reason="invalid", error=f"{self.role.id} does not handle {message.subject}"
            )

    # --- the four kinds of input ---------------------------------------------------------

    async def _on_task(self, message: InboundMessage, task: Task) -> None:
        item = Item(task=task, kind="task", source=task)
        stored = await self.settle.claim(message, item)
        if stored is None:
            return
        rule = self.role.never_rule_for(task.kind)
        if rule is not None and not stored.state.detail.get("approved_by"):
            await self.parking.apply_boundary(message, item, stored, rule)
            return
        await self._run(message, item, stored)

    async def _on_handoff(self, message: InboundMessage, handoff: Handoff) -> None:
        task = review_item(handoff)
        item = Item(task=task, kind=task.kind, source=handoff)
        stored = await self.settle.claim(message, item)
        if stored is not None:
            await self._run(message, item, stored)

    async def _on_escalation(self, message: InboundMessage, escalation: Escalation) -> None:
        found = await self.escalations.get(escalation.id)
        if found is None:  # published by someone outside the bus: start its record now
            await self.escalations.open(record_for(escalation, kind="question"))
            found = await self.escalations.require(escalation.id)
        record = found.record
        if (escalation.from_role or PERSON) != record.asking_role:
            # A climbed copy comes from whoever passed it on (its subject's sender):
            # who asked is what the record's first step says.
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"refused: its from_role is {escalation.from_role!r} but escalation "
                f"{escalation.id} was asked by {record.asking_role}",
            )
            return
        if record.status != "open":
            await self.settle.stale(
                message, f"escalation {escalation.id} is already {record.status}"
            )
            return
        if escalation.level == record.level + 1 and escalation.to_role == self.role.id:
            # Sent one level up before its record said so (the supervisor records
            # the climb first; an older one did not): record it the same way.
            climbed = await climb(self.escalations, self.team, escalation)
            if climbed is None:
                await self.settle.stale(message, f"escalation {escalation.id} changed meanwhile")
                return
            record, effects = climbed
            trace = message.headers.get(Header.TRACEPARENT)
            await publish_effects(self.connection, effects, trace=trace)
        elif escalation.level != record.level or record.holder != self.role.id:
            await self.settle.stale(
                message,
                f"escalation {escalation.id} is held by {record.holder} at level {record.level}",
            )
            return
        task = escalation_item(escalation, record)
        item = Item(task=task, kind="escalation", source=escalation)
        stored = await self.settle.claim(message, item)
        if stored is not None:
            await self._run(message, item, stored)

    async def _on_decision(self, message: InboundMessage, decision: Decision) -> None:
        found = await self.escalations.get(decision.escalation_id)
        if found is None or found.record.task_id is None:
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"decision for unknown escalation {decision.escalation_id!r}",
            )
            return
        record = found.record
        if record.status != "decided":
            await self.settle.stale(
                message, f"escalation {record.id} is not decided: a decision message alone is not"
            )
            return
        # What was decided, and by whom, is what the escalation's record says (its
        # steps are attributed to their writers), not what the message's body says.
        decision = decision.model_copy(
            update={
                "decision": record.decision or decision.decision,
                "approved": record.approved,
                "decided_by": record.decided_by or decision.decided_by,
            }
        )
        parked = await self.states.get(record.task_id or "", role=self.role.id)
        if parked is None:
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"no parked task {record.task_id!r} for this decision",
            )
            return
        if parked.state.terminal:
            await self.settle.finish_again(message, parked)
            return
        if parked.state.waiting_for != record.id:
            await self.settle.stale(
                message, f"task {record.task_id} is not waiting for {record.id}"
            )
            return
        kept = parked.state.source
        if kept is None:
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"task {record.task_id} was parked without its input (rolebus < 0.2?)",
            )
            return
        # The parked item is rebuilt from the message that started it (a task, or a
        # contract to review; its record keeps it), so that finishing it has the same
        # effects.
        original_subject = str(kept["subject"])
        source = codec.decode(original_subject, codec.encode_map(kept["message"]))
        if isinstance(source, Handoff):
            review = review_item(source)
            item = Item(task=review, kind=review.kind, source=source, resume=record.id)
        elif isinstance(source, Task):
            item = Item(task=source, kind="task", source=source, resume=record.id)
        else:
            await self.settle.dead_letter(
                message,
                reason="invalid",
                error=f"{original_subject} cannot be resumed by a decision",
            )
            return
        task = item.task
        stored = await self.settle.claim(
            message, item, subject=original_subject, stream_seq=parked.state.stream_seq
        )
        if stored is None:
            return
        decisions = [d for d in stored.state.detail.get("decisions", []) if d["id"] != decision.id]
        detail = {
            **stored.state.detail,
            "decisions": [*decisions, decision.model_dump(mode="json")],
        }
        if record.kind == "approval":
            if decision.approved is False:
                await self.settle.finish(
                    message,
                    item,
                    stored,
                    state="rejected",
                    error=f"not approved by {decision.decided_by}: {decision.decision}",
                    detail=detail,
                )
                return
            detail["approved_by"] = decision.decided_by
            if record.reason == BUDGET_REASON:
                await self.budgets.approve(
                    self.role,
                    task.id,
                    escalation_id=record.id,
                    options=record.options,
                    decision=decision.decision,
                )
        # The `resumed` record says which decision runs the task (and keeps it).
        changed = await self.settle.change(stored, state=RESUMED, detail=detail)
        if changed is None:
            await self.settle.stale(message, f"task {task.id} changed meanwhile")
            return
        await self._run(message, item, changed)

    # --- running the handler -------------------------------------------------------------

    def cancel_requested(self, task_id: str, reason: str) -> None:
        """``rolebus cancel`` asked: skip the task when it comes, stop it if it runs."""
        self.cancelled[task_id] = reason
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def _end_cancelled(
        self, message: InboundMessage, item: Item, stored: StoredState
    ) -> None:
        reason = self.cancelled.get(item.task.id, "")
        await self.settle.finish(
            message, item, stored, state=CANCELLED, error=f"cancelled: {reason}"
        )

    async def _run(self, message: InboundMessage, item: Item, stored: StoredState) -> None:
        if item.task.id in self.cancelled:
            await self._end_cancelled(message, item, stored)
            return
        trace = message.headers.get(Header.TRACEPARENT)

        def publish_claimed() -> Awaitable[PendingPublish]:
            subject, event = self.settle.note(item, message, "claimed")
            return publish_event(self.connection, event, trace=trace, subject=subject)

        self.notices.begin(message, publish_claimed)
        try:
            context = HandlerContext(
                role=self.role,
                subject=stored.state.subject,
                attempt=message.delivered,
                decisions=[
                    Decision.model_validate(d) for d in stored.state.detail.get("decisions", [])
                ],
                contracts=await self.contracts.resolve(item.task.payload.get("contracts")),
                extra={"input": item.kind},
                team=self.team,
                previous_error=stored.state.previous_error,
                generation=stored.state.failures,
                calls=self.calls,
                budget=TaskBudget(self.budgets, self.role, item.task.id) if self._gated else None,
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
        except RolebusError as error:
            outcome = Outcome.failed(error.message, retryable=False)
        except Exception as error:  # a handler's bug is a retryable failure, not ours
            self._log.warning("handler raised", task_id=item.task.id, error=repr(error))
            outcome = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        finally:
            self._running.pop(item.task.id, None)
        await self.notices.end(message)
        if outcome is None:  # stopped by `rolebus cancel`
            await self._end_cancelled(message, item, stored)
            return
        try:
            await self._apply(message, item, stored, outcome)
        except (RoleError, ContractError) as error:
            # The outcome asked for something impossible (an unknown role, a contract
            # that breaks its predecessor): a permanent failure with the reason.
            await self._apply(message, item, stored, Outcome.failed(error.message, retryable=False))

    async def _apply(
        self, message: InboundMessage, item: Item, stored: StoredState, outcome: Outcome
    ) -> None:
        task = item.task
        # What the handler answered is kept with the state (``rolebus rerun`` compares
        # a new handler's answers with it); every change below carries it along.
        # (Set in place: this attempt's state is its own, made when it was claimed.)
        stored.state.outcome = outcome.model_dump(mode="json", exclude_defaults=True)
        stored.state.usage_reported = False
        sent = stored.state.sent
        follow_ups = follow_up_tasks(task, outcome.tasks, role=self.role.id, first=sent + 1)
        sent += len(follow_ups)
        if outcome.status == "completed":
            extra = await self.parking.completion_effects(item, outcome)
            await self.settle.finish(
                message,
                item,
                stored,
                state="completed",
                result=outcome.result,
                effects=follow_ups + extra,
                sent=sent,
            )
        elif outcome.status == "handoff":
            if outcome.handoff is None:
                raise ContractError("a handoff outcome needs 'handoff'")
            # Handing a reviewed contract on accepts it: the sender hears so too.
            extra = await self.parking.completion_effects(item, outcome)
            handoff_effects = await offer_effects(
                task,
                outcome.handoff,
                number=sent + 1,
                role=self.role.id,
                team=self.team,
                registry=self.contracts,
            )
            await self.settle.finish(
                message,
                item,
                stored,
                state="completed",
                result=outcome.result or {"handed": outcome.handoff.model_dump()},
                effects=follow_ups + extra + handoff_effects,
                sent=sent + 1,
            )
        elif outcome.status == "escalate":
            if outcome.escalation is None:
                raise RoleError("an escalate outcome needs 'escalation'")
            if item.kind == "escalation":
                await self.parking.climb(
                    message, item, stored, outcome.escalation, follow_ups, sent
                )
            else:
                await self.parking.park(
                    message,
                    item,
                    stored,
                    outcome.escalation,
                    follow_ups,
                    sent,
                    approval=outcome.escalation.approval,
                )
        else:
            await self.settle.failed(message, item, stored, outcome)
