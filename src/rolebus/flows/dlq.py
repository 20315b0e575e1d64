"""Dead letters: messages a worker gave up on, kept in ``ROLEBUS_DLQ`` with why.

A dead letter is the original message, unchanged, on ``dlq.<role>.<original
subject>`` with ``Rolebus-Dlq-*`` headers; its Msg-Id is derived from the
original's stream sequence, so two workers (or a worker and the max-deliveries
advisory) that dead-letter the same message store it once. Whose dead letter it
is, and what it was, come from its subject (a role may write only under its own
token), never from a header. :func:`redrive` puts it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog

from rolebus.errors import CodecError, NotFoundError, SubjectError
from rolebus.flows.record import State
from rolebus.flows.state import StateStore
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import StoredMessage
from rolebus.nats.protocol import PubAck, subject_matches
from rolebus.team.roles import Team
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Task, utc_now
from rolebus.wire.subjects import DLQ_STREAM, dlq_subject, parse_dlq_subject, parse_subject

__all__ = ["DeadLetter", "dead_letter", "find", "list_dead_letters", "redrive", "refusal"]

log = structlog.get_logger("rolebus.flows.dlq")

_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the DLQ, as ``rolebus dlq list`` shows it."""

    seq: int
    subject: str
    reason: str
    error: str
    role: str
    attempts: int
    original_seq: int
    task_id: str | None
    time: datetime
    message: StoredMessage

    def as_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "subject": self.subject,
            "reason": self.reason,
            "error": self.error,
            "role": self.role,
            "attempts": self.attempts,
            "original_seq": self.original_seq,
            "task_id": self.task_id,
            "time": self.time.isoformat(),
        }


async def dead_letter(
    connection: Connection,
    *,
    subject: str,
    data: bytes,
    headers: Mapping[str, str],
    stream_seq: int,
    reason: str,
    error: str,
    role: str,
    attempts: int,
) -> PubAck:
    """Store a copy of the message in the DLQ with why, where and how many attempts."""
    kept = {
        key: value
        for key, value in headers.items()
        if key != Header.MSG_ID and not key.startswith("Rolebus-Dlq-")
    }
    kept.update(
        {
            Header.DLQ_REASON: reason,
            Header.DLQ_ERROR: error.replace("\r", " ").replace("\n", " ")[:_ERROR_LIMIT],
            Header.DLQ_ROLE: role,
            Header.DLQ_ATTEMPTS: str(attempts),
            Header.DLQ_SUBJECT: subject,
            Header.DLQ_STREAM_SEQ: str(stream_seq),
        }
    )
    ack = await connection.publish(
        dlq_subject(role, subject), data, msg_id=f"dlq-{stream_seq}", headers=kept
    )
    log.warning(
        "dead-lettered", subject=subject, reason=reason, role=role, attempts=attempts, error=error
    )
    return ack


def _entry(stored: StoredMessage) -> DeadLetter:
    headers = stored.headers
    role, subject = parse_dlq_subject(stored.subject)
    task_id: str | None = None
    with contextlib.suppress(CodecError):
        original = codec.Origin(
            int(headers.get(Header.DLQ_STREAM_SEQ, "0") or 0),
            stored.time,
            headers.get(Header.MSG_ID),
        )
        task_id = codec.decode_as(Task, stored.data, subject=subject, origin=original).id
    if task_id is None:
        # Not a valid Task (that may be why it is here): its id, if the body has one.
        with contextlib.suppress(CodecError):
            body_id = codec.decode_map(stored.data, subject=subject).get("id")
            task_id = body_id if isinstance(body_id, str) and body_id else None
    return DeadLetter(
        seq=stored.seq,
        subject=subject,
        reason=headers.get(Header.DLQ_REASON, "?"),
        error=headers.get(Header.DLQ_ERROR, ""),
        role=role,
        attempts=int(headers.get(Header.DLQ_ATTEMPTS, "0") or 0),
        original_seq=int(headers.get(Header.DLQ_STREAM_SEQ, "0") or 0),
        task_id=task_id,
        time=stored.time,
        message=stored,
    )


async def list_dead_letters(connection: Connection) -> AsyncIterator[DeadLetter]:
    async for stored in connection.streams.read(DLQ_STREAM):
        with contextlib.suppress(SubjectError):  # not under a role: not a dead letter
            yield _entry(stored)


def refusal(entry: DeadLetter, team: Team) -> str | None:
    """Why ``entry`` must not be redriven (None: it may). A worker dead-letters only
    what it was given, so a dead letter about a message its role does not receive
    was not written by that role's worker: republishing it with the operator's
    rights would let the role send what it may not."""
    if entry.role not in team.roles:
        return f"its role {entry.role!r} is not in the team"
    role = team.role(entry.role)
    if not any(subject_matches(pattern, entry.subject) for pattern in role.filter_subjects):
        return f"{entry.role} does not receive {entry.subject!r}: it cannot have given up on it"
    with contextlib.suppress(SubjectError):
        parse_subject(entry.subject)
        return None
    return f"{entry.subject!r} is not a subject rolebus sends"


async def find(connection: Connection, key: str) -> DeadLetter:
    """A dead letter by its DLQ sequence number or by its task id."""
    if key.isdigit():
        stored = await connection.streams.get(DLQ_STREAM, int(key))
        if stored is not None:
            return _entry(stored)
    else:
        async for entry in list_dead_letters(connection):
            if entry.task_id == key:
                return entry
    raise NotFoundError(
        f"no dead letter {key!r}",
        hint="`rolebus dlq list` shows them, with their sequence numbers and task ids",
    )


async def redrive(connection: Connection, entry: DeadLetter) -> PubAck:
    """Put a dead letter back on its original subject and remove it from the DLQ.

    The task keeps its id; the republish uses the Msg-Id ``<id>_redrive_<dlq seq>``
    so JetStream's de-duplication does not swallow it, and its state record is
    reset so the worker runs it again.
    """
    headers = {
        key: value
        for key, value in entry.message.headers.items()
        if not key.startswith("Rolebus-Dlq-")
        and key != Header.MSG_ID
        and not key.startswith("Nats-")  # the server's own headers stay behind
    }
    task_key = entry.task_id or f"seq-{entry.original_seq}"
    data = entry.message.data
    if entry.task_id is not None:
        # A task published without an id was known by its place in the work stream;
        # back on it at another place, it keeps that id only if it carries it.
        with contextlib.suppress(CodecError):
            mapping = codec.decode_map(data)
            if not mapping.get("id"):
                data = codec.encode_map({**mapping, "id": entry.task_id})
        states = StateStore(connection)
        current = await states.get(entry.task_id)
        if current is not None:
            # Its `redriven` record is the event that says so.
            detail = {
                key: value
                for key, value in current.state.detail.items()
                if key != "effects_pending"
            }
            await states.put(
                current.state.model_copy(
                    update={
                        "state": State.REDRIVEN,
                        "error": None,
                        "updated_at": utc_now(),
                        "detail": {**detail, "dlq_seq": entry.seq},
                    }
                )
            )
    ack = await connection.publish(
        entry.subject,
        data,
        msg_id=f"{task_key}_redrive_{entry.seq}",
        headers=headers,
    )
    await connection.streams.delete(DLQ_STREAM, entry.seq)
    log.info("redriven", subject=entry.subject, task_id=entry.task_id, dlq_seq=entry.seq)
    return ack
