"""The supervisor: turns fired escalation timers into climbed escalations.

Every worker process runs one; they share the durable ``supervisor`` consumer
on ``ROLEBUS_TIMERS``, so each fired timer is handled once, and a timer that
fires while no worker runs waits in the stream until one starts.
"""

from __future__ import annotations

import contextlib

import structlog

from rolebus.errors import CodecError, RolebusError
from rolebus.flows.effects import publish_effects
from rolebus.flows.escalation import climb_fired
from rolebus.flows.escalation_store import EscalationStore
from rolebus.nats.admin import ConsumerSpec
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage
from rolebus.nats.puller import Puller
from rolebus.team.roles import Team
from rolebus.wire import codec
from rolebus.wire.messages import Escalation
from rolebus.wire.subjects import (
    SUPERVISOR_CONSUMER,
    TIMERS_STREAM,
)
from rolebus.worker.slots import Slots

__all__ = ["Supervisor"]

log = structlog.get_logger("rolebus.worker.supervisor")

SUPERVISOR_SPEC = _SPEC = ConsumerSpec(
    stream=TIMERS_STREAM,
    name=SUPERVISOR_CONSUMER,
    filter_subjects=("timer.fired.>",),
    ack_wait=30.0,
    max_deliver=-1,
    max_ack_pending=1000,
)


class Supervisor:
    def __init__(self, connection: Connection, team: Team, *, writer: str) -> None:
        """``writer``: the role whose user ``connection`` is (a climb it records is
        taken because the deadline passed, whoever writes it)."""
        self.connection = connection
        self.team = team
        self.escalations = EscalationStore(connection, writer=writer, team=team)
        self.climbed = 0
        self._puller: Puller | None = None
        # Timers are rare: handle them one at a time, in order, off the read loop.
        self._slots = Slots("supervisor", 1, self._process)

    async def start(self) -> None:
        if not await self.connection.admin.consumer_matches(_SPEC):
            await self.connection.admin.ensure_consumer(_SPEC)
        self._puller = self.connection.puller(
            TIMERS_STREAM,
            SUPERVISOR_CONSUMER,
            capacity=16,
            deliver=self._slots.put,
            on_consumer_lost=lambda: self.connection.admin.ensure_consumer(_SPEC),
        )
        self._slots.start()
        await self._puller.start()

    async def stop(self) -> None:
        if self._puller is not None:
            await self._puller.close()
        self._slots.close()
        await self._slots.cancel()

    async def _process(self, message: InboundMessage) -> None:
        try:
            await self._fire(message)
        except RolebusError as error:
            log.warning("timer not handled; retrying", error=str(error))
            with contextlib.suppress(Exception):
                await message.nak(delay=1.0)
        finally:
            if self._puller is not None:
                self._puller.release()

    async def _fire(self, message: InboundMessage) -> None:
        try:
            escalation = codec.decode_as(Escalation, message.data, subject=message.subject)
        except CodecError as error:
            log.error("unreadable timer dropped", subject=message.subject, error=error.message)
            await message.ack()
            return
        effects = await climb_fired(self.escalations, self.team, escalation)
        if effects is None:
            log.debug("stale timer", escalation_id=escalation.id, level=escalation.level)
            await message.ack()
            return
        await publish_effects(self.connection, effects, trace=None)
        await message.ack()
        self.climbed += 1
        log.info(
            "escalation timed out; climbing",
            escalation_id=escalation.id,
            to=escalation.to_role,
            level=escalation.level,
        )
