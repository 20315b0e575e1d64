"""Task records: a task's history and its fence, in one append per transition.

Each record is an event on ``event.task.<state>.<role>.<task id>`` in the history
stream, appended only if nothing was written under that task and role since the
writer read (``Nats-Expected-Last-Subject-Sequence`` on ``event.task.*.<role>.<task
id>``: JetStream's compare-and-set on a subject pattern). The record is the fence
that makes effects happen once: a worker publishes a task's follow-ups only after
it won the append to a terminal state, and the record keeps those follow-ups, so
a redelivery after a crash re-publishes the same messages (same Msg-Ids,
de-duplicated by JetStream) instead of running the handler again.

The record itself is :mod:`rolebus.flows.record`; what changes it is decided by
:mod:`rolebus.flows.lifecycle`. This module reads and appends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rolebus.errors import CodecError
from rolebus.flows.record import TaskState, record_map, state_of
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import StoredMessage
from rolebus.wire import codec
from rolebus.wire.messages import Event, Task, utc_now
from rolebus.wire.subjects import (
    EVENTS_STREAM,
    TASK,
    TASK_RECORDS,
    WORK_STREAM,
    record_subject,
    records_of,
)

__all__ = ["StateStore", "StoredState", "decode_state", "published_tasks"]


@dataclass(frozen=True)
class StoredState:
    """A task's record and its sequence in the history stream: the compare-and-set's
    ``revision`` (0: the task has no record under its role yet)."""

    state: TaskState
    revision: int


def decode_state(stored: StoredMessage) -> TaskState | None:
    """The state in a stored record (None when the message is not one)."""
    return state_of(codec.decode_as(Event, stored.data, subject=stored.subject), stored.subject)


class StateStore:
    """Read and append task records: the history stream is where they live."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def get(self, task_id: str, *, role: str | None = None) -> StoredState | None:
        """The task's newest record under ``role`` (any role's, without it)."""
        found = await self._connection.streams.last(EVENTS_STREAM, records_of(task_id, role or "*"))
        if found is None:
            return None
        state = decode_state(found)
        return None if state is None else StoredState(state, found.seq)

    async def change(
        self, stored: StoredState, *, batch: bool = False, **changes: Any
    ) -> StoredState | None:
        """Compare-and-set: append the changed record if nothing was written under
        the task's role since ``stored`` was read (revision 0: if it has no record);
        None when something was (re-read and decide again). ``batch``: the append
        may share an atomic batch with other writes (a saturated worker's)."""
        updated = stored.state.model_copy(update={**changes, "updated_at": utc_now()})
        return await self.append(updated, stored.revision, batch=batch)

    async def append(
        self, state: TaskState, revision: int, *, batch: bool = False
    ) -> StoredState | None:
        """Append ``state`` if the task's newest record under its role is still
        ``revision`` (0: it has none); None when it is not (read, and decide again).
        ``batch``: the append may share an atomic batch (a saturated worker's).

        A record carries no Msg-Id: JetStream de-duplicates ids across a whole
        stream, so any writer could take a record's id first and make it vanish.
        Its once-only is the compare-and-set on the role's own record subjects; a
        retried append whose first try was stored (its answer lost) is refused by
        that condition, and recognised here by its bytes."""
        data = codec.encode_map(record_map(state, revision))
        if state.outcome and state.outcome.get("usage") and not state.usage_reported:
            state = state.model_copy(update={"usage_reported": True})
        scope = records_of(state.task_id, state.role)
        ack = await self._connection.append(
            record_subject(state.state, state.role, state.task_id),
            data,
            msg_id="",
            last_seq=revision,
            on=scope,
            batch=batch,
        )
        if ack is not None:
            return StoredState(state, ack.seq)
        newest = await self._connection.streams.last(EVENTS_STREAM, scope)
        if newest is not None and newest.seq > revision and newest.data == data:
            return StoredState(state, newest.seq)  # ours: an earlier try was stored
        return None

    async def all(self) -> AsyncIterator[TaskState]:
        """Every task's newest record (one per task and role)."""
        newest: dict[tuple[str, str], tuple[int, TaskState]] = {}
        async for stored in self._connection.streams.read(
            EVENTS_STREAM, filter_subjects=[TASK_RECORDS], last_per_subject=True
        ):
            try:
                state = decode_state(stored)
            except CodecError:
                continue  # not a record this rolebus can read
            if state is None:
                continue
            key = (state.task_id, state.role)
            if key not in newest or newest[key][0] < stored.seq:
                newest[key] = (stored.seq, state)
        for _, state in sorted(newest.values(), key=lambda pair: pair[0]):
            yield state

    async def put(self, state: TaskState) -> StoredState:
        """Append ``state`` whatever the newest record says (operator actions such
        as a redrive)."""
        while True:
            current = await self.get(state.task_id, role=state.role)
            written = await self.append(state, 0 if current is None else current.revision)
            if written is not None:
                return written


async def published_tasks(
    connection: Connection, task_id: str, *, descendants: bool = False
) -> AsyncIterator[tuple[Task, StoredMessage]]:
    """``task_id`` as published in the work stream (with ``descendants``, also the
    tasks it caused, ``<task_id>-<n>``): for a task no worker has recorded yet."""
    async for stored in connection.streams.read(WORK_STREAM, filter_subjects=[f"{TASK}.>"]):
        try:
            task = codec.decode_as(
                Task, stored.data, subject=stored.subject, origin=stored.origin()
            )
        except CodecError:
            continue
        if task.id == task_id or (descendants and task.id.startswith(f"{task_id}-")):
            yield task, stored
