"""One role's worker: the loop that pulls messages and runs them concurrently.

Guarantees (each has a test):

- Nothing acknowledged is lost: a message is acked only after its effects
  (follow-ups, events, state) are stored; a crash before that redelivers it.
- Effects happen once: see :mod:`rolebus.worker.shell` and :mod:`rolebus.flows.state`.
- A live handler is not redelivered: in-flight messages heartbeat
  (``in_progress``) every ``ack_wait / 3``.
- Bounded: at most ``2 x concurrency`` messages are held; ``concurrency`` run.
- Bad input never stops the worker: it is dead-lettered and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import structlog

from rolebus.bus import Bus
from rolebus.errors import PermissionDeniedError, RolebusError
from rolebus.flows import last_try
from rolebus.flows.cancels import Cancellations
from rolebus.handlers.base import Handler, close_handler, start_handler
from rolebus.handlers.loader import load_handler
from rolebus.nats.admin import ConsumerSpec
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.nats.puller import Puller
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire.subjects import WORK_STREAM, consumer_name
from rolebus.worker.executor import DispatchStats
from rolebus.worker.shell import Shell
from rolebus.worker.slots import Slots

__all__ = ["Worker", "consumer_spec_for"]

_FAILURES_KEPT = 1000  # deliveries whose last failure is remembered

log = structlog.get_logger("rolebus.worker.loop")


async def _within(step: Coroutine[Any, Any, Any], seconds: float) -> None:
    """Run one step of a stop for at most ``seconds``, then leave it cancelled: unlike
    wait_for, never wait for a step that does not end when cancelled."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.warning("a step of the worker's stop did not end in time", step=repr(step))
    elif not task.cancelled() and task.exception() is not None:
        log.warning("a step of the worker's stop failed", error=repr(task.exception()))


_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def consumer_spec_for(role: RoleSpec) -> ConsumerSpec:
    """The durable pull consumer every worker of ``role`` shares."""
    return ConsumerSpec(
        stream=WORK_STREAM,
        name=consumer_name(role.id),
        filter_subjects=tuple(role.filter_subjects),
        ack_wait=role.ack_wait,
        max_deliver=role.max_deliver,
        max_ack_pending=max(1000, role.concurrency * 64),
    )


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
        self.handler = handler or load_handler(
            role.handler, role=role.id, runs_dir=bus.settings.home / "runs" / role.id
        )
        self.grace = grace
        self.replica = replica
        self.shell = Shell(
            bus.connection,
            role,
            team,
            self.handler,
            claimed_after=bus.settings.claimed_after,
            calls_age=bus.settings.calls_retention,
        )
        self._connection = bus.connection
        self._consumer = consumer_name(role.id)
        self._slots = Slots(role.id, role.concurrency, self._process)
        self._in_flight: dict[int, tuple[InboundMessage, float]] = {}
        #: Why the bus failed a delivery (stream seq -> error), for the dead letter's
        #: reason if the server gives up on it: a denial is named there, not "no ack".
        self._failures: OrderedDict[int, str] = OrderedDict()
        self._idle = asyncio.Event()  # set whenever nothing is in flight
        self._idle.set()
        self._puller: Puller | None = None
        self._background: list[asyncio.Task[None]] = []
        self._advisories: Any = None
        self._stopping = False
        self._log = log.bind(role=role.id, replica=replica)

    @property
    def stats(self) -> DispatchStats:
        return self.shell.stats

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # --- life cycle -----------------------------------------------------------------

    @property
    def consumer_spec(self) -> ConsumerSpec:
        return consumer_spec_for(self.role)

    async def start(self) -> None:
        await start_handler(self.handler)
        # An admin may have provisioned it (least-privilege users cannot create it).
        if not await self._connection.admin.consumer_matches(self.consumer_spec):
            await self._connection.admin.ensure_consumer(self.consumer_spec)
        # Room for a second batch while the first is handled keeps the slots busy.
        capacity = self.role.concurrency * 2
        self._puller = self._connection.puller(
            WORK_STREAM,
            self._consumer,
            capacity=capacity,
            deliver=self._slots.put,
            on_consumer_lost=lambda: self._connection.admin.ensure_consumer(self.consumer_spec),
        )
        self._advisories = await self._connection.subscribe_core(
            f"{_ADVISORY}.{WORK_STREAM}.{self._consumer}", self._on_max_deliveries
        )
        # The requests made while no worker ran are known before the first delivery.
        cancelled, follow_from = await Cancellations(self._connection).load()
        self.shell.attempts.cancelled.update(cancelled)
        self._slots.start()
        self._background = [
            asyncio.create_task(self._heartbeat(), name=f"{self.role.id} heartbeat"),
            asyncio.create_task(self._follow_cancels(follow_from), name=f"{self.role.id} cancels"),
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
        for queued in self._slots.close():
            await queued.nak()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        await self._slots.cancel()
        await self.shell.attempts.notices.close()
        for task in self._background:
            task.cancel()
        for task in self._background:
            # Bounded: a background reader must not hold the worker's stop.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=5.0)
        for message, _ in list(self._in_flight.values()):
            with contextlib.suppress(Exception):
                await message.nak()
        self._in_flight.clear()
        # Each bounded: a stop must end even with a connection or a handler stuck.
        if self._puller is not None:
            await _within(self._puller.close(), 5.0)
        if self._advisories is not None:
            await _within(self._advisories.close(), 5.0)
        await _within(close_handler(self.handler), 5.0)  # an HTTP pool must not hold the stop
        with contextlib.suppress(Exception):
            await self._connection.flush()
        self._log.info("worker stopped", completed=self.stats.completed)

    # --- delivery -------------------------------------------------------------------

    async def _process(self, message: InboundMessage) -> None:
        """One slot's work on one message: dispatch it, and never let an error out."""
        if self._stopping:
            await message.nak()
            return
        self._in_flight[message.stream_seq] = (message, time.monotonic())
        self._idle.clear()
        try:
            await self.shell.handle(message)
            self._failures.pop(message.stream_seq, None)
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
            self._failures[message.stream_seq] = error.message
            while len(self._failures) > _FAILURES_KEPT:
                self._failures.popitem(last=False)
            with contextlib.suppress(Exception):
                await message.nak(delay=self.role.retry_delay(message.delivered))
        except Exception:
            self._log.exception("bug while processing", subject=message.subject)
            with contextlib.suppress(Exception):
                await message.nak(delay=self.role.retry_delay(message.delivered))
        finally:
            self._in_flight.pop(message.stream_seq, None)
            if not self._in_flight:
                self._idle.set()
            if self._puller is not None:
                self._puller.release()

    async def _follow_cancels(self, from_seq: int) -> None:
        """Each new cancel request, from any machine, as it is made."""
        while True:
            try:
                requests = Cancellations(self._connection).follow(from_seq)
                async with contextlib.aclosing(requests) as followed:
                    async for task_id, reason in followed:
                        self.shell.cancel_requested(task_id, reason)
            except RolebusError as error:  # the server went away: follow again
                self._log.warning("cannot follow cancel requests; retrying", error=str(error))
                await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        period = max(0.1, self.role.ack_wait / 3)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for message, started in list(self._in_flight.values()):
                if now - started >= period:
                    with contextlib.suppress(Exception):
                        await message.in_progress()

    async def _kept(self, seq: int) -> StoredMessage | None:
        """The message at ``seq`` of the work stream, from the note its last attempt
        left (the lifecycle's KeepLastTry); without one (that attempt died before it
        wrote it), from the stream itself, if this user may read it by sequence."""
        note = await last_try.kept(self._connection, self.role.id, seq)
        if note is not None:
            return note
        try:
            return await self._connection.streams.get(WORK_STREAM, seq)
        except PermissionDeniedError as error:
            self._log.error(
                "a message the server gave up on cannot be dead-lettered",
                stream_seq=seq,
                error=error.message,
                hint="its last attempt left no note; the admin can read it with "
                f"`rolebus replay --stream work --from-seq {seq}`",
            )
            return None

    async def _on_max_deliveries(self, advisory: Any) -> None:
        """The server gave up redelivering (the worker died on the last attempt, or
        never acked): move the message to the DLQ so it is not silently stuck."""
        try:
            body = json.loads(advisory.data)
            seq = int(body["stream_seq"])
            deliveries = int(body.get("deliveries", self.role.max_deliver))
        except (ValueError, KeyError, TypeError):
            return
        original = await self._kept(seq)
        if original is None:
            return
        last = self._failures.pop(seq, None)
        await self.shell.gave_up(
            original,
            f"no ack after {deliveries} deliveries (max_deliver {self.role.max_deliver})"
            + (f"; the last attempt failed: {last}" if last else ""),
            attempts=deliveries,
        )
