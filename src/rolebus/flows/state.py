"""Task state records in the ``rolebus_tasks`` KV bucket, changed only by
compare-and-set.

The record is the fence that makes effects happen once: a worker publishes a
task's follow-ups only after it won the compare-and-set to a terminal state,
and the record keeps those follow-ups, so a redelivery after a crash
re-publishes the same messages (same Msg-Ids, de-duplicated by JetStream)
instead of running the handler again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rolebus.errors import CodecError
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import StoredMessage
from rolebus.wire import codec
from rolebus.wire.messages import Task, utc_now
from rolebus.wire.subjects import TASK, TASKS_BUCKET, WORK_STREAM

__all__ = ["PARKED", "STATES", "TERMINAL_STATES", "StateStore", "StoredState", "TaskState"]

#: States after which a task never runs again (unless redriven).
TERMINAL_STATES = frozenset({"completed", "dead", "rejected", "handed-off", "cancelled"})
#: Parked until a decision arrives: only that decision may run the task again.
PARKED = "input-required"
#: Every state a task record can be in.
STATES = frozenset({"claimed", "retrying", PARKED, "redriven", *TERMINAL_STATES})


class TaskState(BaseModel):
    """What the bus knows about one task right now."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    state: str
    role: str
    subject: str
    kind: str = ""
    title: str = ""
    attempt: int = 0
    stream_seq: int = 0
    correlation_id: str | None = None
    causation_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utc_now)
    #: When this attempt's handler started (after the task waited in the backlog).
    started_at: datetime | None = None
    result: Any = None
    error: str | None = None
    #: The handler's last answer (an Outcome as a map), for ``rolebus rerun``.
    outcome: dict[str, Any] | None = None
    #: Follow-up messages to publish once terminal: ``{"subject", "message"}`` maps.
    effects: list[dict[str, Any]] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def waiting_for(self) -> str | None:
        """The escalation this task waits for (parked, or being resumed)."""
        value = self.detail.get("waiting_for")
        return str(value) if value else None

    @property
    def effects_pending(self) -> str | None:
        """Why the effects this record lists are not all stored yet (a full stream,
        say): the task is done, its follow-ups wait. None when they are stored."""
        value = self.detail.get("effects_pending")
        return str(value) if value else None

    @property
    def failures(self) -> int:
        """How many attempts ended in a failed outcome (retried): a retry's model
        calls are new ones; a redelivery after a crash reuses the recorded ones."""
        return int(self.detail.get("failures", 0))

    @property
    def previous_error(self) -> str | None:
        """Why the last failed attempt failed (what a retry's handler is told)."""
        value = self.detail.get("last_error") if self.failures else None
        return str(value) if value else None

    @property
    def sent(self) -> int:
        """How many numbered messages (``<task id>-<n>``) the task has sent."""
        return int(self.detail.get("sent", 0))


@dataclass(frozen=True)
class StoredState:
    """A state record and the KV revision it was read at (for compare-and-set)."""

    state: TaskState
    revision: int


class StateStore:
    """Read and change task states in KV."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def get(self, task_id: str) -> StoredState | None:
        found = await self._connection.kv.get(TASKS_BUCKET, task_id)
        if found is None or not found[0]:
            return None
        value, revision = found
        return StoredState(codec.decode_as(TaskState, value), revision)

    async def claim(
        self,
        task: Task,
        *,
        role: str,
        subject: str,
        attempt: int,
        stream_seq: int,
        resume: str | None = None,
    ) -> StoredState:
        """Mark the task ``claimed`` by ``role``, unless it is terminal, or parked
        waiting for an escalation other than ``resume`` (then the stored state is
        returned unchanged, and the caller must not run the handler)."""
        now = utc_now()
        claimed = TaskState(
            task_id=task.id,
            state="claimed",
            role=role,
            subject=subject,
            kind=task.kind,
            title=task.title,
            attempt=attempt,
            stream_seq=stream_seq,
            correlation_id=task.correlation_id,
            causation_id=task.causation_id,
            created_at=task.created_at,
            updated_at=now,
            started_at=now,
        )
        if attempt == 1 and resume is None:
            # A first delivery: almost always a task never seen before, so neither
            # read nor write the record now (the `claimed` event records the claim).
            # It is created when the task ends or parks; revision 0 means "create",
            # which fails if a record exists after all (a redrive, a re-publish),
            # and the worker then takes the careful path (see Settling.change).
            # This saves a read and an fsynced write per task.
            return StoredState(claimed, 0)
        while True:
            current = await self.get(task.id)
            if current is None:
                revision = await self._connection.kv.create(
                    TASKS_BUCKET, task.id, codec.encode(claimed)
                )
                if revision is not None:
                    return StoredState(claimed, revision)
                continue  # someone created it first: read theirs
            if current.state.terminal or (
                current.state.state == PARKED and current.state.waiting_for != resume
            ):
                return current
            keep = current.state.detail  # decisions, escalations: survive a new attempt
            updated = claimed.model_copy(update={"detail": keep})
            revision = await self._connection.kv.update(
                TASKS_BUCKET, task.id, codec.encode(updated), current.revision
            )
            if revision is not None:
                return StoredState(updated, revision)

    async def change(self, stored: StoredState, **changes: Any) -> StoredState | None:
        """Compare-and-set: apply ``changes`` if nobody wrote since ``stored`` was
        read (revision 0: if the record still does not exist); None when someone
        did (re-read and decide again)."""
        updated = stored.state.model_copy(update={**changes, "updated_at": utc_now()})
        body = codec.encode(updated)
        if stored.revision == 0:
            revision = await self._connection.kv.create(TASKS_BUCKET, updated.task_id, body)
        else:
            revision = await self._connection.kv.update(
                TASKS_BUCKET, updated.task_id, body, stored.revision
            )
        return None if revision is None else StoredState(updated, revision)

    async def all(self) -> AsyncIterator[TaskState]:
        """Every task's current record, streamed."""
        async for _, value in self._connection.kv.items(TASKS_BUCKET):
            yield codec.decode_as(TaskState, value)

    async def put(self, state: TaskState) -> None:
        """Overwrite (operator actions such as a redrive)."""
        await self._connection.kv.put(TASKS_BUCKET, state.task_id, codec.encode(state))


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
