"""The supervisor: turns fired escalation timers into climbed escalations.

Every worker process runs one; they share the durable ``supervisor`` consumer
on ``ROLEBUS_TIMERS``, so each fired timer is handled once, and a timer that
fires while no worker runs waits in the stream until one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from rolebus import codec
from rolebus.errors import CodecError, RolebusError
from rolebus.escalation import EscalationStore
from rolebus.messages import Escalation
from rolebus.roles import Team
from rolebus.subjects import (
    SUPERVISOR_CONSUMER,
    TIMERS_STREAM,
    escalation_subject,
)
from rolebus.transport import Connection, ConsumerSpec, InboundMessage, Puller

__all__ = ["Supervisor"]

log = structlog.get_logger("rolebus.supervisor")

SUPERVISOR_SPEC = _SPEC = ConsumerSpec(
    stream=TIMERS_STREAM,
    name=SUPERVISOR_CONSUMER,
    filter_subjects=("timer.fired.>",),
    ack_wait=30.0,
    max_deliver=-1,
    max_ack_pending=1000,
)


class Supervisor:
    def __init__(self, connection: Connection, team: Team) -> None:
        self.connection = connection
        self.team = team
        self.escalations = EscalationStore(connection)
        self.climbed = 0
        self._puller: Puller | None = None
        self._queue: deque[InboundMessage] = deque()
        self._busy = False
        self._drain_task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        if not await self.connection.consumer_matches(_SPEC):
            await self.connection.ensure_consumer(_SPEC)
        self._puller = self.connection.puller(
            TIMERS_STREAM,
            SUPERVISOR_CONSUMER,
            capacity=16,
            deliver=self._deliver,
            on_consumer_lost=lambda: self.connection.ensure_consumer(_SPEC),
        )
        await self._puller.start()

    async def stop(self) -> None:
        if self._puller is not None:
            await self._puller.close()

    def _deliver(self, message: InboundMessage) -> None:
        # Timers are rare: handle them one at a time, in order, off the read loop.
        self._queue.append(message)
        if not self._busy:
            self._busy = True
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                message = self._queue.popleft()
                try:
                    await self._fire(message)
                except RolebusError as error:
                    log.warning("timer not handled; retrying", error=str(error))
                    with contextlib.suppress(Exception):
                        await message.nak(delay=1.0)
                finally:
                    if self._puller is not None:
                        self._puller.release()
        finally:
            self._busy = False

    async def _fire(self, message: InboundMessage) -> None:
        try:
            escalation = codec.decode_as(Escalation, message.data, subject=message.subject)
        except CodecError as error:
            log.error("unreadable timer dropped", subject=message.subject, error=error.message)
            await message.ack()
            return
        found = await self.escalations.get(escalation.id)
        record = found.record if found is not None else None
        if record is None or record.status != "open" or record.level != escalation.level - 1:
            log.debug("stale timer", escalation_id=escalation.id, level=escalation.level)
            await message.ack()
            return
        await self.connection.publish(
            escalation_subject(escalation.to_role, escalation.reason),
            codec.encode(escalation),
            msg_id=f"{escalation.id}-l{escalation.level}",
        )
        await message.ack()
        self.climbed += 1
        log.info(
            "escalation timed out; climbing",
            escalation_id=escalation.id,
            to=escalation.to_role,
            level=escalation.level,
        )
