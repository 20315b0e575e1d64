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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from rolebus import codec, dlq
from rolebus.contracts import ContractError, ContractRegistry
from rolebus.effects import (
    Effect,
    effect,
    follow_up_tasks,
    publish_effects,
    publish_event,
    state_event,
)
from rolebus.errors import CodecError, RolebusError, RoleError, StaleClaimError
from rolebus.escalation import (
    PERSON,
    EscalationStore,
    climb_target,
    decision_effects,
    decision_from_result,
    escalation_event,
    escalation_item,
    record_for,
    resolve_target,
    timeout_for,
    timer_effects,
)
from rolebus.handlers import Handler, HandlerContext
from rolebus.handoffs import answer_effects, offer_effects, review_item
from rolebus.messages import (
    Decision,
    Envelope,
    Escalation,
    EscalationRequest,
    Event,
    Handoff,
    Outcome,
    Task,
    utc_now,
)
from rolebus.roles import NeverRule, RoleSpec, Team
from rolebus.state import PARKED, StateStore, StoredState
from rolebus.subjects import (
    WORK_STREAM,
    Header,
    escalation_subject,
    task_subject,
)
from rolebus.transport import Connection, InboundMessage, PendingPublish

__all__ = ["DispatchStats", "Dispatcher"]

log = structlog.get_logger("rolebus.worker")


@dataclass
class DispatchStats:
    completed: int = 0
    failed: int = 0
    dead: int = 0
    parked: int = 0
    redelivered_done: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """A work item and what it came from."""

    task: Task
    kind: str  # task | handoff | handoff-answer | escalation | resume
    source: Envelope
    resume: str | None = None


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
        self.claimed_after = claimed_after
        self.role = role
        self.team = team
        self.handler = handler
        self.states = StateStore(connection)
        self.escalations = EscalationStore(connection)
        self.contracts = ContractRegistry(connection)
        self.stats = DispatchStats()
        self._log = log.bind(role=role.id)

    # --- entry -----------------------------------------------------------------------

    async def handle(self, message: InboundMessage) -> None:
        try:
            decoded = codec.decode(message.subject, message.data)
        except CodecError as error:
            reason = "invalid" if "not a valid" in error.message else "undecodable"
            await self._dead_letter(message, reason=reason, error=error.message)
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
            await self._dead_letter(
                message, reason="invalid", error=f"{self.role.id} does not handle {message.subject}"
            )

    # --- the four kinds of input ---------------------------------------------------------

    async def _on_task(self, message: InboundMessage, task: Task) -> None:
        item = Item(task=task, kind="task", source=task)
        stored = await self._claim(message, item)
        if stored is None:
            return
        rule = self.role.never_rule_for(task.kind)
        if rule is not None and not stored.state.detail.get("approved_by"):
            await self._apply_boundary(message, item, stored, rule)
            return
        await self._run(message, item, stored)

    async def _on_handoff(self, message: InboundMessage, handoff: Handoff) -> None:
        task = review_item(handoff)
        item = Item(task=task, kind=task.kind, source=handoff)
        stored = await self._claim(message, item)
        if stored is not None:
            await self._run(message, item, stored)

    async def _on_escalation(self, message: InboundMessage, escalation: Escalation) -> None:
        found = await self.escalations.get(escalation.id)
        if found is None:  # published by someone outside the bus: start its record now
            await self.escalations.open(record_for(escalation, kind="question"))
            found = await self.escalations.require(escalation.id)
        record = found.record
        if record.status != "open":
            await self._stale(message, f"escalation {escalation.id} is already {record.status}")
            return
        if escalation.level == record.level + 1 and escalation.to_role == self.role.id:
            # The server fired the timeout: the escalation climbs to this role.
            climbed = await self.escalations.change(
                found,
                holder=self.role.id,
                level=escalation.level,
                deadline=utc_now() + timedelta(seconds=record.timeout_s),
                trail=[*record.trail, self.role.id],
            )
            if climbed is None:
                await self._stale(message, f"escalation {escalation.id} changed meanwhile")
                return
            await publish_effects(
                self.connection,
                [
                    *timer_effects(self.team, escalation, climbed.record),
                    escalation_event(
                        self.role.id,
                        climbed.record,
                        "climbed",
                        detail={"timeout_at": record.holder},
                    ),
                ],
                trace=message.headers.get(Header.TRACEPARENT),
            )
        elif escalation.level != record.level or record.holder != self.role.id:
            await self._stale(
                message,
                f"escalation {escalation.id} is held by {record.holder} at level {record.level}",
            )
            return
        task = escalation_item(escalation, record)
        item = Item(task=task, kind="escalation", source=escalation)
        stored = await self._claim(message, item)
        if stored is not None:
            await self._run(message, item, stored)

    async def _on_decision(self, message: InboundMessage, decision: Decision) -> None:
        found = await self.escalations.get(decision.escalation_id)
        if found is None or found.record.task_id is None:
            await self._dead_letter(
                message,
                reason="invalid",
                error=f"decision for unknown escalation {decision.escalation_id!r}",
            )
            return
        record = found.record
        parked = await self.states.get(record.task_id or "")
        if parked is None:
            await self._dead_letter(
                message,
                reason="invalid",
                error=f"no parked task {record.task_id!r} for this decision",
            )
            return
        if parked.state.terminal:
            await self._finish_again(message, parked)
            return
        if parked.state.waiting_for != record.id:
            await self._stale(message, f"task {record.task_id} is not waiting for {record.id}")
            return
        original = await self.connection.get_message(WORK_STREAM, parked.state.stream_seq)
        if original is None:
            await self._dead_letter(
                message,
                reason="invalid",
                error=f"task {record.task_id} is no longer in {WORK_STREAM}",
            )
            return
        # The parked item is rebuilt from the message that started it (a task, or a
        # contract to review), so that finishing it has the same effects.
        source = codec.decode(original.subject, original.data)
        if isinstance(source, Handoff):
            review = review_item(source)
            item = Item(task=review, kind=review.kind, source=source, resume=record.id)
        elif isinstance(source, Task):
            item = Item(task=source, kind="task", source=source, resume=record.id)
        else:
            await self._dead_letter(
                message,
                reason="invalid",
                error=f"{original.subject} cannot be resumed by a decision",
            )
            return
        task = item.task
        stored = await self._claim(
            message, item, subject=original.subject, stream_seq=parked.state.stream_seq
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
                await self._finish(
                    message,
                    item,
                    stored,
                    state="rejected",
                    error=f"not approved by {decision.decided_by}: {decision.decision}",
                    detail=detail,
                )
                return
            detail["approved_by"] = decision.decided_by
        changed = await self._change(stored, detail=detail)
        if changed is None:
            await self._stale(message, f"task {task.id} changed meanwhile")
            return
        await (
            await publish_event(
                self.connection,
                self._task_event(
                    item,
                    message,
                    "resumed",
                    detail={"escalation_id": record.id, "decision": decision.decision},
                ),
                trace=message.headers.get(Header.TRACEPARENT),
            )
        ).result()
        await self._run(message, item, changed)

    # --- running the handler -------------------------------------------------------------

    async def _claim(
        self,
        message: InboundMessage,
        item: Item,
        *,
        subject: str | None = None,
        stream_seq: int | None = None,
    ) -> StoredState | None:
        """Claim the item; None when it must not run (done, or parked): then its
        recorded effects were re-published and the message acked."""
        stored = await self.states.claim(
            item.task,
            role=self.role.id,
            subject=subject or message.subject,
            attempt=message.delivered,
            stream_seq=message.stream_seq if stream_seq is None else stream_seq,
            resume=item.resume,
        )
        if stored.state.terminal or (stored.state.state == PARKED and item.resume is None):
            await self._finish_again(message, stored)
            return None
        return stored

    async def _run(self, message: InboundMessage, item: Item, stored: StoredState) -> None:
        trace = message.headers.get(Header.TRACEPARENT)
        # The `claimed` event says "someone is on it": worth a write for the tasks
        # people wait on, not for the ones done before anyone could look. Published
        # only once the handler has run `claimed_after` seconds, it spares a fast
        # task one of its three fsynced writes (35-75 % more tasks/s in the
        # benchmark); its terminal event still records the attempt.
        claimed: asyncio.Task[PendingPublish] | None = None

        def publish_claimed() -> None:
            nonlocal claimed
            event = self._task_event(item, message, "claimed")
            claimed = asyncio.ensure_future(publish_event(self.connection, event, trace=trace))

        if self.claimed_after <= 0:
            publish_claimed()
            timer = None
        else:
            timer = asyncio.get_running_loop().call_later(self.claimed_after, publish_claimed)
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
            )
            outcome = await self.handler(item.task, context)
        except asyncio.CancelledError:
            raise
        except RolebusError as error:
            outcome = Outcome.failed(error.message, retryable=False)
        except Exception as error:  # a handler's bug is a retryable failure, not ours
            self._log.warning("handler raised", task_id=item.task.id, error=repr(error))
            outcome = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        finally:
            if timer is not None:
                timer.cancel()
        if claimed is not None:
            await (await claimed).result()
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
        recorded = outcome.model_dump(mode="json", exclude_defaults=True)
        stored = StoredState(stored.state.model_copy(update={"outcome": recorded}), stored.revision)
        sent = stored.state.sent
        follow_ups = follow_up_tasks(task, outcome.tasks, role=self.role.id, first=sent + 1)
        sent += len(follow_ups)
        if outcome.status == "completed":
            extra = await self._completion_effects(item, outcome)
            await self._finish(
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
            extra = await self._completion_effects(item, outcome)
            handoff_effects = await offer_effects(
                task,
                outcome.handoff,
                number=sent + 1,
                role=self.role.id,
                team=self.team,
                registry=self.contracts,
            )
            await self._finish(
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
                await self._climb(message, item, stored, outcome.escalation, follow_ups, sent)
            else:
                await self._park(
                    message, item, stored, outcome.escalation, follow_ups, sent, approval=False
                )
        else:
            await self._failed(message, item, stored, outcome)

    async def _failed(
        self, message: InboundMessage, item: Item, stored: StoredState, outcome: Outcome
    ) -> None:
        attempt = message.delivered
        error = outcome.error or "failed"
        if outcome.retryable and attempt < self.role.max_deliver:
            delay = self._backoff(attempt)
            changed = await self._change(stored, state="retrying", error=error, attempt=attempt)
            if changed is None:
                await message.ack()
                return
            event = self._task_event(
                item, message, "retrying", error=error, detail={"delay_s": delay}
            )
            await (
                await publish_event(
                    self.connection, event, trace=message.headers.get(Header.TRACEPARENT)
                )
            ).result()
            await message.nak(delay=delay)
            self.stats.failed += 1
            self._log.info(
                "task failed; will retry",
                task_id=item.task.id,
                attempt=attempt,
                subject=message.subject,
                delay_s=delay,
                error=error,
            )
            return
        reason = "failed" if not outcome.retryable else "max-deliver"
        await self._dead_letter(message, reason=reason, error=error, item=item, stored=stored)

    def _backoff(self, attempt: int) -> float:
        delays = self.role.backoff or [1.0]
        return delays[min(attempt, len(delays)) - 1]

    # --- outcomes that talk to other roles -------------------------------------------

    async def _completion_effects(self, item: Item, outcome: Outcome) -> list[Effect]:
        """Completing a handoff review answers the sender; completing an escalation
        is the decision."""
        result = outcome.result
        if item.kind == "handoff" and isinstance(item.source, Handoff):
            return await answer_effects(
                item.source, result, role=self.role.id, team=self.team, registry=self.contracts
            )
        if item.kind == "escalation" and isinstance(item.source, Escalation):
            decision_text, approved = decision_from_result(result)
            return await self._decide(item.source, decision_text, approved, decided_by=self.role.id)
        return []

    async def _decide(
        self, escalation: Escalation, text: str, approved: bool | None, *, decided_by: str
    ) -> list[Effect]:
        decided = await self.escalations.decide(
            escalation.id, decision=text, approved=approved, decided_by=decided_by
        )
        if decided is not None:
            return decision_effects(decided, self.team)
        return []  # someone (a person, a higher role) decided first

    async def _park(
        self,
        message: InboundMessage,
        item: Item,
        stored: StoredState,
        request: EscalationRequest,
        follow_ups: list[Effect],
        sent: int,
        *,
        approval: bool,
        boundary: str | None = None,
    ) -> None:
        """Escalate: the task waits (``input-required``) for the decision."""
        task = item.task
        to = resolve_target(self.team, self.role, request.reason, request.to)
        timeout = timeout_for(self.role, request.reason)
        escalation = Escalation(
            id=f"{task.id}-{sent + 1}",
            to_role=to,
            reason=request.reason,
            question=request.question,
            task_id=task.id,
            options=request.options,
            timeout_s=timeout,
            from_role=self.role.id,
            correlation_id=task.flow_id,
            causation_id=task.id,
        )
        record = await self.escalations.open(
            record_for(escalation, kind="approval" if approval else "question")
        )
        effects = [
            *follow_ups,
            effect(
                escalation_subject(to, request.reason), escalation, msg_id=f"{escalation.id}-l0"
            ),
            *timer_effects(self.team, escalation, record),
            escalation_event(
                self.role.id, record, "opened", detail={"boundary": boundary} if boundary else {}
            ),
        ]
        detail = {
            **stored.state.detail,
            "waiting_for": escalation.id,
            "sent": sent + 1,
            "escalated_to": to,
            "reason": request.reason,
        }
        parked = await self._change(
            stored,
            state=PARKED,
            effects=effects,
            detail=detail,
            attempt=message.delivered,
            error=None,
        )
        if parked is None:
            await message.ack()
            return
        await self._publish_resting(message, parked)
        await message.ack()
        self.stats.parked += 1
        self._log.info(
            "task escalated",
            task_id=task.id,
            to=to,
            reason=request.reason,
            escalation_id=escalation.id,
        )

    async def _climb(
        self,
        message: InboundMessage,
        item: Item,
        stored: StoredState,
        request: EscalationRequest,
        follow_ups: list[Effect],
        sent: int,
    ) -> None:
        """The deciding role does not know either: pass it one level up (or to ``to``)."""
        assert isinstance(item.source, Escalation)
        escalation = item.source
        to = request.to or climb_target(self.team, self.role.id)
        if to != PERSON and to not in self.team.roles:
            raise RoleError(f"escalation to role {to!r}, which does not exist")
        found = await self.escalations.require(escalation.id)
        effects = list(follow_ups)
        if found.record.status == "open" and found.record.level == escalation.level:
            higher = escalation.model_copy(update={"to_role": to, "level": escalation.level + 1})
            changed = await self.escalations.change(
                found,
                holder=to,
                level=higher.level,
                trail=[*found.record.trail, to],
                deadline=utc_now() + timedelta(seconds=found.record.timeout_s),
            )
            if changed is not None:
                effects.append(
                    effect(
                        escalation_subject(to, escalation.reason),
                        higher,
                        msg_id=f"{escalation.id}-l{higher.level}",
                    )
                )
                effects += timer_effects(self.team, higher, changed.record)
                effects.append(
                    escalation_event(
                        self.role.id, changed.record, "climbed", detail={"why": request.question}
                    )
                )
        await self._finish(
            message,
            item,
            stored,
            state="completed",
            result={"climbed_to": to, "why": request.question},
            effects=effects,
            sent=sent,
        )

    async def _apply_boundary(
        self, message: InboundMessage, item: Item, stored: StoredState, rule: NeverRule
    ) -> None:
        """The role must never do this alone: ask, hand over, or refuse."""
        task = item.task
        sent = stored.state.sent
        if rule.action == "approval":
            request = EscalationRequest(
                reason=task.kind,
                to=rule.to,
                question=f"{self.role.title} asks approval to {task.kind}: {task.title} "
                f"(rule: never {rule.what})",
            )
            await self._park(
                message, item, stored, request, [], sent, approval=True, boundary=rule.what
            )
            return
        if rule.action == "handoff" and rule.to is not None:
            target = self.team.role(rule.to)
            if not target.domains:
                raise RoleError(
                    f"role {rule.to} owns no domain to hand {task.kind} to", file=self.role.source
                )
            moved = task.model_copy(
                update={
                    "id": f"{task.id}-{sent + 1}",
                    "from_role": self.role.id,
                    "correlation_id": task.flow_id,
                    "causation_id": task.id,
                }
            )
            subject = task_subject(target.domains[0], task.kind)
            await self._finish(
                message,
                item,
                stored,
                state="handed-off",
                result={
                    "to": rule.to,
                    "task_id": moved.id,
                    "subject": subject,
                    "because": f"{self.role.id} never {rule.what}",
                },
                effects=[effect(subject, moved)],
                sent=sent + 1,
            )
            return
        await self._finish(
            message, item, stored, state="rejected", error=f"{self.role.id} never {rule.what}"
        )

    # --- finishing ----------------------------------------------------------------------

    async def _finish(
        self,
        message: InboundMessage,
        item: Item,
        stored: StoredState,
        *,
        state: str,
        result: Any = None,
        error: str | None = None,
        effects: list[Effect] | None = None,
        sent: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Compare-and-set to a terminal state (with its effects), publish, ack."""
        new_detail = dict(detail if detail is not None else stored.state.detail)
        new_detail.pop("waiting_for", None)
        if sent is not None:
            new_detail["sent"] = sent
        finished = await self._change(
            stored,
            state=state,
            result=result,
            error=error,
            effects=effects or [],
            attempt=message.delivered,
            detail=new_detail,
        )
        if finished is None:  # finished elsewhere meanwhile
            await message.ack()
            return
        await self._publish_resting(message, finished)
        await message.ack()
        if state == "completed":
            self.stats.completed += 1
        self.stats.by_state[state] = self.stats.by_state.get(state, 0) + 1
        # The common case stays off the info level: a line per task is a cost on the
        # hot path (and a flood); the exceptions are worth one.
        report = self._log.debug if state == "completed" else self._log.info
        report(
            f"task {state}",
            task_id=item.task.id,
            subject=message.subject,
            attempt=message.delivered,
            input=item.kind,
        )

    async def _publish_resting(self, message: InboundMessage, stored: StoredState) -> None:
        await publish_effects(
            self.connection,
            [
                *stored.state.effects,
                effect("event.task." + stored.state.state, state_event(stored.state, self.role.id)),
            ],
            trace=message.headers.get(Header.TRACEPARENT),
        )

    async def _finish_again(self, message: InboundMessage, stored: StoredState) -> None:
        """Already done (or parked) before a crash: publish the same effects again
        (de-duplicated by Msg-Id) and ack, without running the handler."""
        await self._publish_resting(message, stored)
        await message.ack()
        self.stats.redelivered_done += 1

    async def _change(self, stored: StoredState, **changes: Any) -> StoredState | None:
        """Compare-and-set; None if the item reached a terminal state elsewhere."""
        current: StoredState | None = stored
        while current is not None:
            changed = await self.states.change(current, **changes)
            if changed is not None:
                return changed
            fresh = await self.states.get(stored.state.task_id)
            if fresh is None or fresh.state.terminal:
                return None
            if current.revision == 0 and (fresh.state.state == PARKED or fresh.state.sent):
                # A first delivery met a record it did not read (a re-published or
                # redriven task with history): its effects were numbered without
                # that history. Retry: the next delivery reads the record first.
                raise StaleClaimError(
                    f"task {stored.state.task_id} has a record this attempt did not read"
                )
            current = fresh
        return None

    async def _stale(self, message: InboundMessage, why: str) -> None:
        self._log.info("stale message ignored", subject=message.subject, why=why)
        await message.ack()

    # --- dead letters ----------------------------------------------------------------

    async def _dead_letter(
        self,
        message: InboundMessage,
        *,
        reason: str,
        error: str,
        item: Item | None = None,
        stored: StoredState | None = None,
    ) -> None:
        await dlq.dead_letter(
            self.connection,
            subject=message.subject,
            data=message.data,
            headers=message.headers,
            stream_seq=message.stream_seq,
            reason=reason,
            error=error,
            role=self.role.id,
            attempts=message.delivered,
        )
        task_id = item.task.id if item is not None else f"seq-{message.stream_seq}"
        if stored is not None:
            await self._change(
                stored, state="dead", error=error, attempt=message.delivered, effects=[]
            )
        event = Event(
            id=f"{task_id}_dead_{message.stream_seq}",
            state="dead",
            task_id=task_id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=item.task.flow_id if item is not None else None,
            causation_id=task_id,
            error=error,
            detail={"reason": reason, "stream_seq": message.stream_seq},
        )
        await (
            await publish_event(
                self.connection, event, trace=message.headers.get(Header.TRACEPARENT)
            )
        ).result()
        await message.ack()
        self.stats.dead += 1

    # --- small builders ----------------------------------------------------------------

    def _task_event(
        self,
        item: Item,
        message: InboundMessage,
        state: str,
        *,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Event:
        task = item.task
        return Event(
            id=f"{task.id}_{state}_{message.stream_seq}_{message.delivered}",
            state=state,
            task_id=task.id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=task.flow_id,
            causation_id=task.id,
            error=error,
            detail={"input": item.kind, "title": task.title, **(detail or {})},
        )
