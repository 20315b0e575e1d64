"""Publishing a record's outbox (:mod:`rolebus.flows.outbox` builds it) and events.

Every entry is published with its Msg-Id, so publishing an outbox again (a
redelivery after a crash) stores nothing twice.
"""

from __future__ import annotations

from rolebus.flows.outbox import Effect
from rolebus.nats.connection import Connection
from rolebus.nats.publish import PendingPublish, wait_all
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event
from rolebus.wire.subjects import event_subject
from rolebus.wire.trace import child_traceparent

__all__ = ["publish_effects", "publish_event"]


async def publish_effects(
    connection: Connection, effects: list[Effect], *, trace: str | None, batch: bool = False
) -> None:
    """Publish every effect, pipelined, and wait for all acks (retrying alone).
    ``batch``: through the streams' group commit, sharing fsyncs with whatever else
    is published in the same event-loop turn (for a worker with a backlog)."""
    child_trace = child_traceparent(trace)
    pending: list[PendingPublish] = []
    for entry in effects:
        headers = {Header.TRACEPARENT: child_trace, **entry.get("headers", {})}
        subject, data = entry["subject"], codec.encode_map(entry["message"])
        if batch:
            publish = connection.publish_batched(
                subject, data, msg_id=entry["msg_id"], headers=headers
            )
        else:
            publish = await connection.publish_start(
                subject, data, msg_id=entry["msg_id"], headers=headers
            )
        pending.append(publish)
    await wait_all(pending)


async def publish_event(
    connection: Connection, event: Event, *, trace: str | None, subject: str | None = None
) -> PendingPublish:
    """Start publishing one event (on ``subject``, or its entity's and state's);
    await ``.result()`` before acking what caused it."""
    headers = {Header.TRACEPARENT: trace} if trace else None
    return await connection.publish_start(
        subject or event_subject(event.entity, event.state),
        codec.encode(event),
        msg_id=event.id,
        headers=headers,
    )
