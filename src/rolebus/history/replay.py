"""The history: read any stream back in order, filtered, without touching workers.

Replay reads through an ephemeral no-ack consumer (see
:meth:`rolebus.nats.connection.Connection.read_stream`), so it streams with constant
memory and no worker's durable consumer notices. Sequence gaps (messages that
expired or were deleted) are reported, not hidden.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from rolebus.errors import CodecError, ConfigError
from rolebus.flows.record import TaskState
from rolebus.flows.state import StateStore, decode_state
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import StoredMessage
from rolebus.team.durations import parse_duration
from rolebus.team.roles import Team
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Envelope, Event
from rolebus.wire.subjects import (
    DLQ_STREAM,
    EVENTS_STREAM,
    STREAMS,
    TASK_RECORDS,
    WORK_STREAM,
    is_task_event,
    sender_of,
    validate_pattern,
    with_senders,
)

log = structlog.get_logger("rolebus.history.replay")

__all__ = [
    "ReplayFilter",
    "Replayed",
    "flow_states",
    "iter_events",
    "parse_since",
    "read_events",
    "replay",
    "stream_named",
]

_ALIASES = {"work": WORK_STREAM, "events": EVENTS_STREAM, "dlq": DLQ_STREAM}


def stream_named(name: str) -> str:
    """A stream by its name or short alias (work, events, dlq, timers)."""
    known = {spec.name for spec in STREAMS}
    full = _ALIASES.get(name.lower(), name.upper() if name.upper() in known else name)
    if full not in known and name.lower() != "timers":
        raise ConfigError(
            f"unknown stream {name!r}",
            hint="streams: events (ROLEBUS_EVENTS, the default), work (ROLEBUS_WORK), "
            "dlq (ROLEBUS_DLQ), timers (ROLEBUS_TIMERS)",
        )
    return full if full in known else "ROLEBUS_TIMERS"


def parse_since(value: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """A time (RFC 3339) or a duration ago (``10m``, ``2h``, ``1d``)."""
    text = value.strip()
    if re.match(r"^\d+(\.\d+)?\s*(ms|s|m|h|d)$", text):
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not a time",
            hint=f"give a time (2026-11-22T04:00:00Z) or a duration ago ({option} 10m)",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class ReplayFilter:
    stream: str = EVENTS_STREAM
    subject: str | None = None
    role: str | None = None
    correlation: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    from_seq: int | None = None
    follow: bool = False

    def __post_init__(self) -> None:
        if self.subject is not None:
            validate_pattern(self.subject)


@dataclass(frozen=True)
class Replayed:
    """One message read back, decoded when it could be."""

    stored: StoredMessage
    message: Envelope | None
    error: str | None = None
    gap_before: int = 0

    def _envelope(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "stream": self.stored.stream,
            "seq": self.stored.seq,
            "subject": self.stored.subject,
            "time": self.stored.time.isoformat(),
            "headers": dict(self.stored.headers),
        }
        if self.error:
            document["error"] = self.error
        if self.gap_before:
            document["gap_before"] = self.gap_before
        return document

    def as_json(self) -> dict[str, Any]:
        message = self.message.model_dump(mode="json") if self.message else None
        return {**self._envelope(), "message": message}

    def as_json_line(self) -> str:
        """:meth:`as_json` as one line of JSON, the message serialized by pydantic
        itself: ``rolebus replay --json`` writes tens of thousands a second."""
        head = json.dumps(self._envelope())
        body = self.message.model_dump_json() if self.message else "null"
        return f'{head[:-1]}, "message": {body}}}'


def _addressed_to(subject: str, role: str, team: Team | None) -> bool:
    tokens = subject.split(".")
    if tokens[0] == "dlq":
        tokens = tokens[1:]
    if len(tokens) < 3:
        return False
    if tokens[0] == "task":
        return team is not None and team.domain_owner.get(tokens[1]) == role
    return tokens[1] == role


def _matches(item: Replayed, wanted: ReplayFilter, team: Team | None) -> bool:
    message = item.message
    if wanted.until is not None and item.stored.time > wanted.until:
        return False
    if wanted.correlation is not None:
        if message is None:
            return False
        ids = {message.id, message.correlation_id, getattr(message, "task_id", None)}
        if wanted.correlation not in ids:
            return False
    if wanted.role is not None:
        # Whose it is: the role token of its subject where it has one (a task's
        # record, a dead letter), where the server let only that role write.
        if is_task_event(item.stored.subject):
            return item.stored.subject.split(".")[3] == wanted.role
        if isinstance(message, Event):
            # Written by the role (the subject's writer token), or about it.
            writer = item.stored.subject.split(".")[3:4]
            return message.role == wanted.role or writer == [wanted.role]
        if item.stored.subject.startswith("dlq."):
            return item.stored.subject.split(".")[1] == wanted.role
        sender = sender_of(item.stored.subject)
        return sender == wanted.role or _addressed_to(item.stored.subject, wanted.role, team)
    return True


async def replay(
    connection: Connection, wanted: ReplayFilter, *, team: Team | None = None
) -> AsyncIterator[Replayed]:
    """The messages of one stream that match ``wanted``, oldest first."""
    previous: int | None = None
    async for stored in connection.streams.read(
        wanted.stream,
        filter_subjects=with_senders(wanted.subject) if wanted.subject else None,
        start_seq=wanted.from_seq,
        start_time=wanted.since,
        follow=wanted.follow,
    ):
        gap = 0
        # Without a subject filter every sequence comes; a jump means messages that
        # expired or were deleted. (With one, skipped sequences are other subjects.)
        if wanted.subject is None and previous is not None and stored.seq > previous + 1:
            gap = stored.seq - previous - 1
        previous = stored.seq
        if wanted.until is not None and stored.time > wanted.until and not wanted.follow:
            return
        try:
            decoded = codec.decode(stored.subject, stored.data, origin=_origin(stored))
            item = Replayed(stored, decoded, gap_before=gap)
        except CodecError as error:
            item = Replayed(stored, None, error.message, gap_before=gap)
        if _matches(item, wanted, team) or gap:
            yield item


async def iter_events(
    connection: Connection, *, states: list[str] | None = None
) -> AsyncIterator[Event]:
    """Every event so far (task events of some ``states`` only, when given), oldest
    first. A stored event this rolebus cannot decode is passed over with a warning:
    one bad message must not stop every reader (``replay`` shows it as it is)."""
    subjects = [f"event.task.{state}.>" for state in states] if states else None
    async for stored in connection.streams.read(EVENTS_STREAM, filter_subjects=subjects):
        try:
            yield codec.decode_as(Event, stored.data, subject=stored.subject)
        except CodecError as error:
            log.warning(
                "an event cannot be decoded; passed over",
                seq=stored.seq,
                subject=stored.subject,
                error=error.message,
            )


async def read_events(connection: Connection, *, states: list[str] | None = None) -> list[Event]:
    """All events (every entity unless ``states`` picks task states), oldest first."""
    return [event async for event in iter_events(connection, states=states)]


async def all_states(connection: Connection) -> list[TaskState]:
    """The live projection: every task's newest record, in one read."""
    return [state async for state in iter_states(connection)]


async def iter_states(connection: Connection) -> AsyncIterator[TaskState]:
    """Every task's current state, streamed (memory does not grow with the tasks)."""
    async for state in StateStore(connection).all():
        yield state


async def flow_states(connection: Connection, correlation_id: str) -> list[TaskState]:
    return [
        state
        async for state in iter_states(connection)
        if state.correlation_id == correlation_id or state.task_id == correlation_id
    ]


def _origin(stored: StoredMessage) -> codec.Origin | None:
    # Only the work stream holds messages that may lack an id; a dead letter keeps
    # its original's sequence in a header.
    if stored.stream == WORK_STREAM:
        return stored.origin()
    if stored.stream == DLQ_STREAM and Header.DLQ_STREAM_SEQ in stored.headers:
        original = int(stored.headers[Header.DLQ_STREAM_SEQ] or 0)
        return codec.Origin(original, stored.time, stored.headers.get(Header.MSG_ID))
    return None


@dataclass(frozen=True)
class Difference:
    """A task whose live state and rebuilt state disagree (None: missing on that side)."""

    task_id: str
    live: tuple[str, str] | None
    rebuilt: tuple[str, str] | None


async def fold(connection: Connection) -> dict[tuple[str, str], tuple[str, str]]:
    """The projection from every record alone: each task's last state, by task and
    by the role its records are under (the subject's token, where the server let
    them be written: a record under another role's name is that role's, and never
    changes this one's tasks)."""
    projection: dict[tuple[str, str], tuple[str, str]] = {}
    async for stored in connection.streams.read(EVENTS_STREAM, filter_subjects=[TASK_RECORDS]):
        try:
            state = decode_state(stored)
        except CodecError:
            continue  # not a record this rolebus can read
        if state is None or state.task_id.startswith("seq-"):
            continue  # a message that never became a task (undecodable, stray): no state
        projection[(state.task_id, state.role)] = (state.state, state.role)
    return projection


async def rebuild(connection: Connection) -> tuple[dict[str, tuple[str, str]], list[Difference]]:
    """Recompute the task projection from every record in ``ROLEBUS_EVENTS`` and
    compare it with the newest record of each task (read as the workers read it)."""
    rebuilt = await fold(connection)
    live = {
        (state.task_id, state.role): (state.state, state.role)
        for state in await all_states(connection)
        if not state.task_id.startswith("seq-")
    }
    differences = [
        Difference(key[0], live.get(key), rebuilt.get(key))
        for key in sorted(set(live) | set(rebuilt))
        if live.get(key) != rebuilt.get(key)
    ]
    return {f"{task_id}@{role}": value for (task_id, role), value in rebuilt.items()}, differences
