"""One role's worker: pull, run the handler, turn its outcome into effects, ack.

Guarantees (each has a test):

- Nothing acknowledged is lost: a message is acked only after its effects
  (follow-ups, events, state) are stored; a crash before that redelivers it.
- Effects happen once: follow-up ids are derived from the cause
  (``<task id>-<n>``), the task's state record is changed by compare-and-set,
  and a redelivered task whose record is terminal re-publishes the recorded
  effects (de-duplicated by Msg-Id) instead of running again.
- A live handler is not redelivered: in-flight messages heartbeat
  (``in_progress``) every ``ack_wait / 3``.
- Bad input never stops the worker: undecodable or invalid messages, permanent
  failures and exhausted retries go to ``dlq.<subject>`` and the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from rolebus import codec, dlq
from rolebus.bus import Bus, child_traceparent
from rolebus.errors import CodecError, RolebusError
from rolebus.handlers import Handler, HandlerContext, load_handler
from rolebus.messages import Envelope, Event, Outcome, Task
from rolebus.roles import RoleSpec, Team
from rolebus.state import StateStore, StoredState
from rolebus.subjects import (
    TASK,
    WORK_STREAM,
    Header,
    consumer_name,
    event_subject,
    parse_subject,
)
from rolebus.transport import ConsumerSpec, InboundMessage, PendingPublish, Puller

__all__ = ["Worker", "WorkerStats"]

log = structlog.get_logger("rolebus.worker")

_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def terminal_event_id(task_id: str, state: str, stream_seq: int) -> str:
    """The id of a task's terminal event: one ``completed`` per task ever; one
    ``dead`` (or other end) per stored copy of it (a redrive is a new copy)."""
    return f"{task_id}_completed" if state == "completed" else f"{task_id}_{state}_{stream_seq}"


@dataclass
class WorkerStats:
    """Counters a worker keeps about itself (for `rolebus up` and the tests)."""

    completed: int = 0
    failed: int = 0
    dead: int = 0
    redelivered_done: int = 0
    in_flight: int = 0
    started_at: float = field(default_factory=time.monotonic)


class Worker:
    """Runs one role: ``await worker.start()``, then ``await worker.stop()``."""

    def __init__(
        self,
        bus: Bus,
        role: RoleSpec,
        team: Team,
        *,
        handler: Handler | None = None,
        grace: float = 30.0,
        replica: int = 1,
    ) -> None:
        self.bus = bus
        self.role = role
        self.team = team
        self.handler = handler or load_handler(role.handler, role=role.id)
        self.grace = grace
        self.replica = replica
        self.stats = WorkerStats()
        self.states = StateStore(bus.connection)
        self._connection = bus.connection
        self._consumer = consumer_name(role.id)
        self._queue: deque[InboundMessage] = deque()
        self._ready = asyncio.Event()
        self._in_flight: dict[int, tuple[InboundMessage, float]] = {}
        self._idle = asyncio.Event()  # set whenever nothing is in flight
        self._idle.set()
        self._puller: Puller | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        self._advisories: Any = None
        self._stopping = False
        self._log = log.bind(role=role.id, replica=replica)
        self.on_event: Callable[[Event], Awaitable[None]] | None = None

    # --- life cycle -----------------------------------------------------------------

    @property
    def consumer_spec(self) -> ConsumerSpec:
        role = self.role
        return ConsumerSpec(
            stream=WORK_STREAM,
            name=self._consumer,
            filter_subjects=tuple(role.filter_subjects),
            ack_wait=role.ack_wait,
            max_deliver=role.max_deliver,
            max_ack_pending=max(1000, role.concurrency * 64),
        )

    async def start(self) -> None:
        await self._connection.ensure_consumer(self.consumer_spec)
        # Room for a second batch while the first is handled keeps the slots busy.
        capacity = self.role.concurrency * 2
        self._puller = self._connection.puller(
            WORK_STREAM,
            self._consumer,
            capacity=capacity,
            deliver=self._deliver,
            on_consumer_lost=lambda: self._connection.ensure_consumer(self.consumer_spec),
        )
        self._advisories = await self._connection.subscribe_core(
            f"{_ADVISORY}.{WORK_STREAM}.{self._consumer}", self._on_max_deliveries
        )
        self._slots = [
            asyncio.create_task(self._slot(), name=f"{self.role.id} slot {index}")
            for index in range(self.role.concurrency)
        ]
        self._background = [
            asyncio.create_task(self._heartbeat(), name=f"{self.role.id} heartbeat")
        ]
        await self._puller.start()
        self._log.info("worker started", consumer=self._consumer, concurrency=len(self._slots))

    async def stop(self, grace: float | None = None) -> None:
        """Stop pulling, let running handlers finish within ``grace`` seconds, nak the
        rest (they are redelivered to another replica or the next start)."""
        grace = self.grace if grace is None else grace
        self._stopping = True
        if self._puller is not None:
            await self._puller.stop()
        while self._queue:
            await self._queue.popleft().nak()
        self._ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for task in self._slots + self._background:
            task.cancel()
        for task in self._slots + self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for message, _ in list(self._in_flight.values()):
            with contextlib.suppress(Exception):
                await message.nak()
        self._in_flight.clear()
        if self._puller is not None:
            await self._puller.close()
        if self._advisories is not None:
            await self._advisories.close()
        with contextlib.suppress(Exception):
            await self._connection.flush()
        self._log.info("worker stopped", completed=self.stats.completed)

    # --- delivery -------------------------------------------------------------------

    def _deliver(self, message: InboundMessage) -> None:
        self._queue.append(message)
        self._ready.set()

    async def _slot(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
                if self._stopping:
                    return
            message = self._queue.popleft()
            if self._stopping:
                await message.nak()
                continue
            self._in_flight[message.stream_seq] = (message, time.monotonic())
            self._idle.clear()
            self.stats.in_flight = len(self._in_flight)
            try:
                await self._process(message)
            except asyncio.CancelledError:
                raise
            except RolebusError as error:
                # The bus itself failed (server gone, stream full): try again later.
                self._log.error(
                    "could not process; will retry",
                    error=str(error),
                    subject=message.subject,
                    seq=message.stream_seq,
                )
                with contextlib.suppress(Exception):
                    await message.nak(delay=self._backoff(message.delivered))
            except Exception:
                self._log.exception("bug while processing", subject=message.subject)
                with contextlib.suppress(Exception):
                    await message.nak(delay=self._backoff(message.delivered))
            finally:
                self._in_flight.pop(message.stream_seq, None)
                self.stats.in_flight = len(self._in_flight)
                if not self._in_flight:
                    self._idle.set()
                if self._puller is not None:
                    self._puller.release()

    async def _heartbeat(self) -> None:
        period = max(0.1, self.role.ack_wait / 3)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for message, started in list(self._in_flight.values()):
                if now - started >= period:
                    with contextlib.suppress(Exception):
                        await message.in_progress()

    def _backoff(self, attempt: int) -> float:
        delays = self.role.backoff or [1.0]
        return delays[min(attempt, len(delays)) - 1]

    # --- processing -----------------------------------------------------------------

    async def _process(self, message: InboundMessage) -> None:
        try:
            decoded = codec.decode(message.subject, message.data)
        except CodecError as error:
            reason = "invalid" if "not a valid" in error.message else "undecodable"
            await self._dead_letter(message, reason=reason, error=error.message, task=None)
            return
        if message.subject.startswith(TASK + ".") and isinstance(decoded, Task):
            await self._run_task(message, decoded)
        else:
            await self._run_other(message, decoded)

    async def _run_other(self, message: InboundMessage, decoded: Envelope) -> None:
        """Handoffs, escalations and decisions addressed to this role."""
        self._log.warning("no route for message yet; dead-lettering", subject=message.subject)
        await self._dead_letter(
            message,
            reason="rejected",
            error=f"{self.role.id} cannot handle {message.subject}",
            task=None,
        )

    async def _run_task(self, message: InboundMessage, task: Task) -> None:
        attempt = message.delivered
        stored = await self.states.claim(
            task,
            role=self.role.id,
            subject=message.subject,
            attempt=attempt,
            stream_seq=message.stream_seq,
        )
        if stored.state.terminal:
            # Done before (a crash after the effects, before the ack): finish the
            # effects again (de-duplicated) and ack without running the handler.
            await self._publish_effects(stored, message)
            await message.ack()
            self.stats.redelivered_done += 1
            return
        claimed = await self._start_event(task, message, "claimed")
        context = HandlerContext(role=self.role, subject=message.subject, attempt=attempt)
        try:
            outcome = await self.handler(task, context)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a handler's bug is a retryable failure, not ours
            self._log.warning("handler raised", task_id=task.id, error=repr(error))
            outcome = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        await claimed.result()
        await self._apply(message, task, stored, outcome)

    async def _apply(
        self, message: InboundMessage, task: Task, stored: StoredState, outcome: Outcome
    ) -> None:
        attempt = message.delivered
        if outcome.status == "completed":
            follow_ups = self._follow_ups(task, outcome)
            finished = await self._change(
                stored,
                state="completed",
                result=outcome.result,
                error=None,
                attempt=attempt,
                effects=follow_ups,
            )
            if finished is None:  # someone else finished it meanwhile
                await message.ack()
                return
            await self._publish_effects(finished, message)
            await message.ack()
            self.stats.completed += 1
            self._log.info(
                "task completed",
                task_id=task.id,
                subject=message.subject,
                attempt=attempt,
                follow_ups=len(follow_ups),
            )
            return
        if outcome.status == "failed":
            error = outcome.error or "failed"
            if outcome.retryable and attempt < self.role.max_deliver:
                delay = self._backoff(attempt)
                changed = await self._change(stored, state="retrying", error=error, attempt=attempt)
                if changed is None:
                    await message.ack()
                    return
                await (
                    await self._start_event(
                        task, message, "retrying", error=error, detail={"delay_s": delay}
                    )
                ).result()
                await message.nak(delay=delay)
                self.stats.failed += 1
                self._log.info(
                    "task failed; will retry",
                    task_id=task.id,
                    attempt=attempt,
                    subject=message.subject,
                    delay_s=delay,
                    error=error,
                )
                return
            reason = "failed" if not outcome.retryable else "max-deliver"
            await self._dead_letter(message, reason=reason, error=error, task=task, stored=stored)
            return
        # escalate / handoff: routed by the escalation and contract policies.
        await self._dead_letter(
            message,
            reason="rejected",
            error=f"outcome {outcome.status!r} is not routed yet",
            task=task,
            stored=stored,
        )

    async def _change(self, stored: StoredState, **changes: Any) -> StoredState | None:
        """Compare-and-set the task's state; None if it became terminal elsewhere."""
        current: StoredState | None = stored
        while current is not None:
            changed = await self.states.change(current, **changes)
            if changed is not None:
                return changed
            current = await self.states.get(stored.state.task_id)
            if current is None or current.state.terminal:
                return None
        return None

    def _follow_ups(self, task: Task, outcome: Outcome) -> list[dict[str, Any]]:
        effects = []
        for number, follow_up in enumerate(outcome.tasks, start=1):
            parsed = parse_subject(follow_up.subject)
            child = Task(
                id=f"{task.id}-{number}",
                kind=follow_up.kind or parsed.third,
                title=follow_up.title,
                payload=follow_up.payload,
                from_role=self.role.id,
                correlation_id=task.flow_id,
                causation_id=task.id,
            )
            effects.append({"subject": follow_up.subject, "message": child.model_dump(mode="json")})
        return effects

    async def _publish_effects(self, stored: StoredState, message: InboundMessage) -> None:
        """Publish a terminal state's follow-ups and its event (idempotent by Msg-Id)."""
        state = stored.state
        trace = child_traceparent(message.headers.get(Header.TRACEPARENT))
        pending: list[PendingPublish] = []
        for effect in state.effects:
            body = codec.encode_map(effect["message"])
            pending.append(
                await self._connection.publish_start(
                    effect["subject"],
                    body,
                    msg_id=str(effect["message"]["id"]),
                    headers={Header.TRACEPARENT: trace},
                )
            )
        event = Event(
            id=terminal_event_id(state.task_id, state.state, state.stream_seq),
            state=state.state,
            task_id=state.task_id,
            role=self.role.id,
            subject=state.subject,
            attempt=state.attempt,
            correlation_id=state.correlation_id or state.task_id,
            causation_id=state.task_id,
            result=state.result,
            error=state.error,
            detail={
                "follow_ups": [effect["message"]["id"] for effect in state.effects],
                **state.detail,
            },
        )
        pending.append(await self._event_publish(event, trace))
        for publish in pending:
            await publish.result()

    async def _start_event(
        self,
        task: Task,
        message: InboundMessage,
        state: str,
        *,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> PendingPublish:
        event = Event(
            id=f"{task.id}_{state}_{message.stream_seq}_{message.delivered}",
            state=state,
            task_id=task.id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=task.flow_id,
            causation_id=task.id,
            error=error,
            detail=detail or {},
        )
        return await self._event_publish(event, message.headers.get(Header.TRACEPARENT))

    async def _event_publish(self, event: Event, trace: str | None) -> PendingPublish:
        if self.on_event is not None:
            await self.on_event(event)
        headers = {Header.TRACEPARENT: trace} if trace else None
        return await self._connection.publish_start(
            event_subject("task", event.state),
            codec.encode(event),
            msg_id=event.id,
            headers=headers,
        )

    # --- dead letters ---------------------------------------------------------------

    async def _dead_letter(
        self,
        message: InboundMessage,
        *,
        reason: str,
        error: str,
        task: Task | None,
        stored: StoredState | None = None,
    ) -> None:
        await dlq.dead_letter(
            self._connection,
            subject=message.subject,
            data=message.data,
            headers=message.headers,
            stream_seq=message.stream_seq,
            reason=reason,
            error=error,
            role=self.role.id,
            attempts=message.delivered,
        )
        task_id = task.id if task is not None else f"seq-{message.stream_seq}"
        if stored is not None:
            stored = await self._change(
                stored, state="dead", error=error, attempt=message.delivered, effects=[]
            )
        event = Event(
            id=terminal_event_id(task_id, "dead", message.stream_seq),
            state="dead",
            task_id=task_id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=task.flow_id if task is not None else None,
            causation_id=task_id,
            error=error,
            detail={"reason": reason, "stream_seq": message.stream_seq},
        )
        await (await self._event_publish(event, message.headers.get(Header.TRACEPARENT))).result()
        await message.ack()
        self.stats.dead += 1

    async def _on_max_deliveries(self, advisory: Any) -> None:
        """The server gave up redelivering (the worker died on the last attempt, or
        never acked): move the message to the DLQ so it is not silently stuck."""
        try:
            body = json.loads(advisory.data)
            seq = int(body["stream_seq"])
            deliveries = int(body.get("deliveries", self.role.max_deliver))
        except (ValueError, KeyError, TypeError):
            return
        stored_message = await self._connection.get_message(WORK_STREAM, seq)
        if stored_message is None:
            return
        task: Task | None = None
        with contextlib.suppress(CodecError):
            task = codec.decode_as(Task, stored_message.data, subject=stored_message.subject)
        error = f"no ack after {deliveries} deliveries (max_deliver {self.role.max_deliver})"
        await dlq.dead_letter(
            self._connection,
            subject=stored_message.subject,
            data=stored_message.data,
            headers=stored_message.headers,
            stream_seq=seq,
            reason="max-deliver",
            error=error,
            role=self.role.id,
            attempts=deliveries,
        )
        if task is not None:
            current = await self.states.get(task.id)
            if current is not None and not current.state.terminal:
                await self._change(current, state="dead", error=error, effects=[])
        task_id = task.id if task is not None else f"seq-{seq}"
        event = Event(
            id=terminal_event_id(task_id, "dead", seq),
            state="dead",
            task_id=task_id,
            role=self.role.id,
            subject=stored_message.subject,
            attempt=deliveries,
            correlation_id=task.flow_id if task is not None else None,
            causation_id=task_id,
            error=error,
            detail={"reason": "max-deliver", "stream_seq": seq},
        )
        await (await self._event_publish(event, None)).result()
