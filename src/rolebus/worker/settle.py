"""How a delivery ends: the state record is changed (compare-and-set), then the
effects it lists are published, and only then is the message acked.

Shared by every kind of input (:mod:`rolebus.worker.dispatch`) and by the outcomes that
park or escalate (:mod:`rolebus.worker.parking`). A redelivery of something already done
publishes the recorded effects again (the same Msg-Ids, de-duplicated) instead of
running the handler twice.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from rolebus.errors import RolebusError, StaleClaimError
from rolebus.flows import dlq
from rolebus.flows.effects import Effect, publish_effects, publish_event
from rolebus.flows.state import WAITING, StateStore, StoredState, TaskState
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.team.roles import RoleSpec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Envelope, Event, Outcome, Task, from_nanoseconds
from rolebus.wire.subjects import WORK_STREAM, last_try_subject, note_subject

__all__ = ["DispatchStats", "Item", "Settling"]


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


class Settling:
    """Claiming, finishing, retrying and dead-lettering a delivery (held by the
    :class:`~rolebus.worker.dispatch.Dispatcher` and the
    :class:`~rolebus.worker.parking.Parking`)."""

    def __init__(
        self,
        connection: Connection,
        role: RoleSpec,
        states: StateStore,
        stats: DispatchStats,
        log: Any,  # a structlog logger bound to the role
    ) -> None:
        self.connection = connection
        self.role = role
        self.states = states
        self.stats = stats
        self.log = log

    async def claim(
        self,
        message: InboundMessage,
        item: Item,
        *,
        subject: str | None = None,
        stream_seq: int | None = None,
    ) -> StoredState | None:
        """Claim the item; None when it must not run (done, or parked): then its
        recorded effects were re-published and the message acked."""
        if message.delivered >= self.role.max_deliver:
            await self._last_try(message, item)
        stored = await self.states.claim(
            item.task,
            role=self.role.id,
            subject=subject or message.subject,
            attempt=message.delivered,
            stream_seq=message.stream_seq if stream_seq is None else stream_seq,
            resume=item.resume,
        )
        if stored.state.terminal or (stored.state.state in WAITING and item.resume is None):
            await self.finish_again(message, stored)
            return None
        return stored

    async def _last_try(self, message: InboundMessage, item: Item) -> None:
        """Before the last attempt the server allows, a note keeps the message: if
        this attempt dies too, the server's max-deliveries advisory names only its
        sequence, and a role may not read the work stream by sequence (that would
        let it read any role's work). The worker that buries it reads this note."""
        subject = last_try_subject(self.role.id, item.task.id, message.stream_seq)
        note = Event(
            id=f"{item.task.id}_last-try_{message.stream_seq}",
            state="last-try",
            task_id=item.task.id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            detail={
                "stream_seq": message.stream_seq,
                "time_ns": message.time_ns,
                "data": base64.b64encode(message.data).decode(),
                "headers": dict(message.headers),
            },
        )
        trace = message.headers.get(Header.TRACEPARENT)
        await (await publish_event(self.connection, note, trace=trace, subject=subject)).result()

    async def failed(
        self, message: InboundMessage, item: Item, stored: StoredState, outcome: Outcome
    ) -> None:
        attempt = message.delivered
        error = outcome.error or "failed"
        if outcome.retryable and attempt < self.role.max_deliver:
            delay = self.role.retry_delay(attempt)
            detail = {
                **stored.state.detail,
                "failures": stored.state.failures + 1,
                "last_error": error,
                "delay_s": delay,
            }
            # The record is the `retrying` event: it carries the attempt's cost
            # (its outcome's usage) and when it started.
            changed = await self.change(
                stored, state="retrying", error=error, attempt=attempt, detail=detail
            )
            if changed is None:
                await self.finished_elsewhere(message, stored.state.task_id)
                return
            await message.nak(delay=delay)
            self.stats.failed += 1
            self.log.info(
                "task failed; will retry",
                task_id=item.task.id,
                attempt=attempt,
                subject=message.subject,
                delay_s=delay,
                error=error,
            )
            return
        reason = "failed" if not outcome.retryable else "max-deliver"
        await self.dead_letter(message, reason=reason, error=error, item=item, stored=stored)

    async def finish(
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
        # A saturated worker's records share fsyncs like its effects do.
        backlog = self.has_backlog(message)
        finished = await self.change(
            stored,
            batch=backlog,
            state=state,
            result=result,
            error=error,
            effects=effects or [],
            attempt=message.delivered,
            detail=new_detail,
            source=None,  # a finished task is resumed by nothing
        )
        if finished is None:
            await self.finished_elsewhere(message, stored.state.task_id)
            return
        # A first run's effects are new Msg-Ids; a redelivery's (finish_again) may be
        # stored already, and one duplicate refuses a whole batch: those go alone.
        await self._store_effects(message, finished, batch=backlog)
        await message.ack()
        if state == "completed":
            self.stats.completed += 1
        self.stats.by_state[state] = self.stats.by_state.get(state, 0) + 1
        # The common case stays off the info level: a line per task is a cost on the
        # hot path (and a flood); the exceptions are worth one.
        report = self.log.debug if state == "completed" else self.log.info
        report(
            f"task {state}",
            task_id=item.task.id,
            subject=message.subject,
            attempt=message.delivered,
            input=item.kind,
        )

    async def publish_resting(
        self, message: InboundMessage, stored: StoredState, *, batch: bool = False
    ) -> None:
        """Publish the record's outbox (its record is its event: nothing else)."""
        if stored.state.effects:
            await publish_effects(
                self.connection,
                stored.state.effects,
                trace=message.headers.get(Header.TRACEPARENT),
                batch=batch,
            )

    def has_backlog(self, message: InboundMessage) -> bool:
        """More messages wait on the server than the worker holds: it is saturated,
        and its records and effects share atomic batches (one fsync for many;
        bench/README has the gain). A worker keeping up sends them alone: a batch
        is slow to start, and bursts at a steady rate must not pay that."""
        return message.pending >= 2 * self.role.concurrency

    async def _store_effects(
        self, message: InboundMessage, stored: StoredState, *, batch: bool = False
    ) -> None:
        """Publish the record's effects. If they cannot all be stored (a full stream),
        the record says so before the error goes on (the delivery is retried): a
        task must not look done while its follow-ups do not exist. Only that case
        costs a write; the redelivery that stores them clears it."""
        try:
            await self.publish_resting(message, stored, batch=batch)
        except RolebusError as error:
            if stored.state.effects_pending != error.message:
                detail = {**stored.state.detail, "effects_pending": error.message}
                await self.states.change(stored, detail=detail)
            raise
        if stored.state.effects_pending:
            # Kept as None, not dropped: the record was counted as completed once.
            await self.states.change(
                stored, detail={**stored.state.detail, "effects_pending": None}
            )

    async def finished_elsewhere(self, message: InboundMessage, task_id: str) -> None:
        """The record reached a terminal state under another delivery. Its writer may
        not have stored its effects and event: it can have died, or lost its answer,
        right after the write (a server restart). So they are published again
        (de-duplicated by Msg-Id) before this delivery is acked, never just dropped."""
        fresh = await self.states.get(task_id, role=self.role.id)
        if fresh is not None and fresh.state.terminal:
            await self.finish_again(message, fresh)
        else:
            await message.ack()

    async def finish_again(self, message: InboundMessage, stored: StoredState) -> None:
        """Already done (or parked) before a crash: publish the same effects again
        (de-duplicated by Msg-Id) and ack, without running the handler."""
        await self._store_effects(message, stored)
        await message.ack()
        self.stats.redelivered_done += 1

    async def change(
        self, stored: StoredState, *, batch: bool = False, **changes: Any
    ) -> StoredState | None:
        """Compare-and-set; None if the item reached a terminal state elsewhere.
        Applied to a newer record, the change still carries this attempt's outcome.
        ``batch``: the record may share an atomic batch (see :meth:`has_backlog`)."""
        changes = {
            "outcome": stored.state.outcome,
            "usage_reported": stored.state.usage_reported,
            **changes,
        }
        current: StoredState | None = stored
        while current is not None:
            changed = await self.states.change(current, batch=batch, **changes)
            if changed is not None:
                return changed
            fresh = await self.states.get(stored.state.task_id, role=stored.state.role)
            if fresh is None or fresh.state.terminal:
                return None
            if current.revision == 0 and (fresh.state.state in WAITING or fresh.state.sent):
                # A first delivery met a record it did not read (a re-published or
                # redriven task with history): its effects were numbered without
                # that history. Retry: the next delivery reads the record first.
                raise StaleClaimError(
                    f"task {stored.state.task_id} has a record this attempt did not read"
                )
            current = fresh
        return None

    async def stale(self, message: InboundMessage, why: str) -> None:
        self.log.info("stale message ignored", subject=message.subject, why=why)
        await message.ack()

    async def dead_letter(
        self,
        message: InboundMessage,
        *,
        reason: str,
        error: str,
        item: Item | None = None,
        stored: StoredState | None = None,
    ) -> None:
        """Give up on a delivery: bury it, then ack it."""
        await self.bury(
            StoredMessage(
                stream=WORK_STREAM,
                seq=message.stream_seq,
                subject=message.subject,
                time=from_nanoseconds(message.time_ns),
                headers=message.headers,
                data=message.data,
            ),
            reason=reason,
            error=error,
            attempts=message.delivered,
            task=item.task if item is not None else None,
            stored=stored,
        )
        await message.ack()

    async def bury(
        self,
        original: StoredMessage,
        *,
        reason: str,
        error: str,
        attempts: int,
        task: Task | None,
        stored: StoredState | None,
    ) -> None:
        """The one dead-letter path: the message goes to ``dlq.>`` with the reason,
        its task's state becomes ``dead`` and a ``dead`` event says so. For the
        worker's own give-ups and for the server's (max-deliver advisories)."""
        await dlq.dead_letter(
            self.connection,
            subject=original.subject,
            data=original.data,
            headers=original.headers,
            stream_seq=original.seq,
            reason=reason,
            error=error,
            role=self.role.id,
            attempts=attempts,
        )
        detail = {"reason": reason, "stream_seq": original.seq}
        task_id = task.id if task is not None else f"seq-{original.seq}"
        if stored is None:
            stored = await self.states.get(task_id, role=self.role.id)
        if stored is None:
            # Never recorded (a message that never decoded into a task is named
            # after its place in the work stream).
            fresh = TaskState(
                task_id=task_id,
                state="claimed",
                role=self.role.id,
                subject=original.subject,
                kind=task.kind if task is not None else "",
                title=task.title if task is not None else "",
                stream_seq=original.seq,
                correlation_id=task.correlation_id if task is not None else None,
                causation_id=task.causation_id if task is not None else None,
                created_at=task.created_at if task is not None else None,
            )
            stored = StoredState(fresh, 0)
        # The `dead` record says why (a task that ended meanwhile stays as it ended).
        await self.change(
            stored,
            state="dead",
            error=error,
            attempt=attempts,
            effects=[],
            detail={**stored.state.detail, **detail},
        )
        self.stats.dead += 1

    def note(
        self,
        item: Item,
        message: InboundMessage,
        state: str,
        *,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> tuple[str, Event]:
        """A note about this attempt (``claimed``) and where it goes."""
        task = item.task
        number = f"{message.stream_seq}-{message.delivered}"
        return note_subject(state, self.role.id, task.id, number), Event(
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
