"""The last-try note: a copy of a message kept before its last allowed attempt.

If that attempt dies too, the server's max-deliveries advisory names only the
message's sequence, and a role may not read the work stream by sequence (that would
let it read any role's work). The worker that buries it reads this note instead.
Its format (an event on ``event.task.last-try.<role>.<task id>.<stream seq>`` whose
detail holds the message) is written and read here only.
"""

from __future__ import annotations

import base64
import contextlib

from rolebus.errors import CodecError
from rolebus.flows.effects import publish_event
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage, StoredMessage
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event, from_nanoseconds
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM, last_try_subject

__all__ = ["keep", "kept"]


async def keep(connection: Connection, role: str, task_id: str, delivery: InboundMessage) -> None:
    """Keep ``delivery``'s message (stored before the attempt runs)."""
    note = Event(
        id=f"{task_id}_last-try_{delivery.stream_seq}",
        state="last-try",
        task_id=task_id,
        role=role,
        subject=delivery.subject,
        attempt=delivery.delivered,
        detail={
            "stream_seq": delivery.stream_seq,
            "time_ns": delivery.time_ns,
            "data": base64.b64encode(delivery.data).decode(),
            "headers": dict(delivery.headers),
        },
    )
    subject = last_try_subject(role, task_id, delivery.stream_seq)
    trace = delivery.headers.get(Header.TRACEPARENT)
    await (await publish_event(connection, note, trace=trace, subject=subject)).result()


async def kept(connection: Connection, role: str, stream_seq: int) -> StoredMessage | None:
    """The message at ``stream_seq`` of the work stream, as its note kept it (None:
    no note, or one this rolebus cannot read)."""
    note = await connection.streams.last(EVENTS_STREAM, last_try_subject(role, "*", stream_seq))
    if note is None:
        return None
    with contextlib.suppress(CodecError, KeyError, ValueError, TypeError):
        detail = codec.decode_as(Event, note.data, subject=note.subject).detail
        return StoredMessage(
            stream=WORK_STREAM,
            seq=stream_seq,
            subject=str(codec.decode_map(note.data)["subject"]),
            time=from_nanoseconds(int(detail["time_ns"])),
            headers={str(k): str(v) for k, v in dict(detail["headers"]).items()},
            data=base64.b64decode(str(detail["data"])),
        )
    return None
