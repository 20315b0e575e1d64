"""The history: lifecycle events in ``ROLEBUS_EVENTS``, read back in order."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rolebus import codec
from rolebus.messages import Event
from rolebus.subjects import EVENTS_STREAM
from rolebus.transport import Connection

__all__ = ["iter_events", "read_events"]


async def iter_events(
    connection: Connection, *, states: list[str] | None = None
) -> AsyncIterator[Event]:
    """Every task event so far, oldest first (optionally only some states)."""
    subjects = [f"event.task.{state}" for state in states] if states else None
    async for stored in connection.read_stream(EVENTS_STREAM, filter_subjects=subjects):
        yield codec.decode_as(Event, stored.data, subject=stored.subject)


async def read_events(connection: Connection, *, states: list[str] | None = None) -> list[Event]:
    return [event async for event in iter_events(connection, states=states)]
