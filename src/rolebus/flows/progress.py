"""Live progress: what a long handler says while it works, as ``event.task.progress``.

Bounded, because progress is history: at most ``RATE`` events a second per task (the
ones in between are counted, not stored: the next event says how many) and ``LIMIT``
per attempt. A progress report never fails the task it reports on.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from rolebus.errors import RolebusError
from rolebus.flows.effects import publish_event
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event, Task, check_value
from rolebus.wire.subjects import note_subject

__all__ = ["LIMIT", "RATE", "ProgressReporter"]

log = structlog.get_logger("rolebus.flows.progress")

RATE = 4.0  # events a second, per task
LIMIT = 500  # events per attempt


class ProgressReporter:
    """One task attempt's progress sink (:class:`~rolebus.handlers.base.ProgressSink`)."""

    def __init__(
        self, connection: Connection, role: str, task: Task, message: InboundMessage
    ) -> None:
        self._connection = connection
        self._role = role
        self._task = task
        self._message = message
        self._sent = 0
        self._skipped = 0
        self._last = float("-inf")

    async def __call__(self, text: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._sent >= LIMIT or now - self._last < 1.0 / RATE:
            self._skipped += 1
            return
        self._last = now
        self._sent += 1
        message, task = self._message, self._task
        try:
            detail = check_value({"text": str(text)[:2000], **fields}, what="progress")
            if self._skipped:
                detail["skipped"] = self._skipped
            event = Event(
                id=f"{task.id}_progress_{message.stream_seq}_{message.delivered}_{self._sent}",
                state="progress",
                task_id=task.id,
                role=self._role,
                subject=message.subject,
                attempt=message.delivered,
                correlation_id=task.flow_id,
                causation_id=task.id,
                detail=detail,
            )
            pending = await publish_event(
                self._connection,
                event,
                trace=message.headers.get(Header.TRACEPARENT),
                subject=note_subject(
                    "progress",
                    self._role,
                    task.id,
                    f"{message.stream_seq}-{message.delivered}-{self._sent}",
                ),
            )
            await pending.result()
        except (RolebusError, ValueError, TypeError) as error:
            log.debug("progress not recorded", task_id=task.id, error=str(error))
            return
        self._skipped = 0
