"""Task records: a task's history and its fence, in one append per transition.

Each record is an event on ``event.task.<state>.<role>.<task id>`` in the history
stream, appended only if nothing was written under that task and role since the
writer read (``Nats-Expected-Last-Subject-Sequence`` on ``event.task.*.<role>.<task
id>``: JetStream's compare-and-set on a subject pattern). The record is the fence
that makes effects happen once: a worker publishes a task's follow-ups only after
it won the append to a terminal state, and the record keeps those follow-ups, so
a redelivery after a crash re-publishes the same messages (same Msg-Ids,
de-duplicated by JetStream) instead of running the handler again.
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
from rolebus.wire.messages import EVENT_SCHEMA_VERSION, Event, Task, utc_now
from rolebus.wire.subjects import (
    EVENTS_STREAM,
    TASK,
    TASK_RECORDS,
    WORK_STREAM,
    record_subject,
    records_of,
)

__all__ = [
    "PARKED",
    "RESUMED",
    "STATES",
    "TERMINAL_STATES",
    "WAITING",
    "StateStore",
    "StoredState",
    "TaskState",
    "decode_state",
    "event_detail",
    "record_map",
    "started",
    "state_of",
]

#: States after which a task never runs again (unless redriven).
TERMINAL_STATES = frozenset({"completed", "dead", "rejected", "handed-off", "cancelled"})
#: Parked until a decision arrives: only that decision may run the task again.
PARKED = "input-required"
#: A decision arrived and its task runs again: only that decision's delivery may run it.
RESUMED = "resumed"
#: The states in which a task waits for one escalation's decision.
WAITING = frozenset({PARKED, RESUMED})
#: Every state a task record can be in.
STATES = frozenset({"claimed", "retrying", PARKED, RESUMED, "redriven", *TERMINAL_STATES})


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
    #: A parked task's input (``{"subject", "message"}``: the task, or the contract
    #: to review, as decoded): what a decision resumes, without reading the work
    #: stream by sequence (which would let a role read any role's work).
    source: dict[str, Any] | None = None
    #: Whether a record already reported ``outcome``'s usage (each attempt's cost
    #: is counted once, by the first record that carries it).
    usage_reported: bool = False
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
    """A task's record and its sequence in the history stream: the compare-and-set's
    ``revision`` (0: the task has no record under its role yet)."""

    state: TaskState
    revision: int


#: Record fields an event does not have (kept under the event's ``record`` key).
_RECORD_ONLY = (
    "kind",
    "title",
    "stream_seq",
    "correlation_id",
    "causation_id",
    "created_at",
    "started_at",
    "outcome",
    "effects",
    "usage_reported",
    "source",
)
#: Keys an event's detail adds to the record's (see :func:`event_detail`).
_EVENT_ADDED = ("usage", "follow_ups", "started_at")


def started(state: TaskState) -> dict[str, str]:
    """When the attempt's handler started, for an event's detail: the time before it
    is the time the task waited (the flow picture draws it)."""
    return {"started_at": state.started_at.isoformat()} if state.started_at else {}


def event_detail(state: TaskState, own: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a record tells a reader of events: the record's detail (``own``, when
    already dumped; without its message counter), what the attempt cost, its
    follow-ups, when it started."""
    given = state.detail if own is None else own
    detail = {key: value for key, value in given.items() if key != "sent"}
    # What this attempt cost (LLM roles): the records are the usage history, so the
    # first record that carries an outcome reports its usage, and no later one.
    if state.outcome and state.outcome.get("usage") and not state.usage_reported:
        detail["usage"] = state.outcome["usage"]
    detail["follow_ups"] = [
        entry["msg_id"]
        for entry in state.effects
        if not entry["subject"].startswith(("event.", "timer."))
    ]
    detail.update(started(state))
    return detail


def record_map(state: TaskState, revision: int) -> dict[str, Any]:
    """The record as it is stored: an event (any reader of events reads it as one)
    plus ``record``, the rest of the state. Its id names the write: the task, the
    state and the record it follows, so a retried append is de-duplicated and a
    different one is not."""
    dumped = state.model_dump(mode="json")
    record = {key: dumped[key] for key in _RECORD_ONLY}
    if state.sent:
        record["sent"] = state.sent
    detail = event_detail(state, dumped["detail"])
    record["usage_reported"] = state.usage_reported or "usage" in detail
    return {
        "schema_version": EVENT_SCHEMA_VERSION,
        "id": f"{state.task_id}_{state.state}_{revision}",
        "correlation_id": state.correlation_id or state.task_id,
        "causation_id": state.task_id,
        "created_at": dumped["updated_at"],
        "entity": "task",
        "state": state.state,
        "task_id": state.task_id,
        "role": state.role,
        "subject": state.subject,
        "attempt": state.attempt,
        "at": dumped["updated_at"],
        "result": dumped["result"],
        "error": state.error,
        "detail": detail,
        "record": record,
    }


def state_of(event: Event, subject: str | None = None) -> TaskState | None:
    """The task state a record holds (None for an event that is not a record). The
    role is the one its subject names: the server let only that role (or the
    operator) write there, whatever the body says."""
    record = event.record
    if record is None:
        return None
    role = subject.split(".")[3] if subject else (event.role or "")
    detail = {key: value for key, value in event.detail.items() if key not in _EVENT_ADDED}
    if record.get("sent"):
        detail["sent"] = record["sent"]
    return TaskState.model_validate(
        {
            **{key: record[key] for key in _RECORD_ONLY if key in record},
            "task_id": event.task_id,
            "state": event.state,
            "role": role,
            "subject": event.subject or "",
            "attempt": event.attempt,
            "updated_at": event.at,
            "result": event.result,
            "error": event.error,
            "detail": detail,
        }
    )


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
            # A first delivery: almost always a task never seen before, so do not
            # even read. The record that ends the attempt is created with "no
            # record yet" as its condition, which fails if one exists after all (a
            # redrive, a re-publish): the worker then takes the careful path (see
            # Settling.change). So a task that runs once costs one write.
            return StoredState(claimed, 0)
        # A redelivery or a resume reads the record, and writes nothing yet: the
        # record that ends the attempt is conditional on this one, so of two
        # deliveries running at once only one can finish the task.
        current = await self.get(task.id, role=role)
        if current is None:
            return StoredState(claimed, 0)
        if current.state.terminal or (
            current.state.state in WAITING and current.state.waiting_for != resume
        ):
            return current
        # Decisions, escalations and a parked task's input survive a new attempt.
        detail = {key: value for key, value in current.state.detail.items() if key != "delay_s"}
        keep = {"detail": detail, "source": current.state.source}
        return StoredState(claimed.model_copy(update=keep), current.revision)

    async def change(
        self, stored: StoredState, *, batch: bool = False, **changes: Any
    ) -> StoredState | None:
        """Compare-and-set: append the changed record if nothing was written under
        the task's role since ``stored`` was read (revision 0: if it has no record);
        None when something was (re-read and decide again). ``batch``: the append
        may share an atomic batch with other writes (a saturated worker's)."""
        updated = stored.state.model_copy(update={**changes, "updated_at": utc_now()})
        return await self._append(updated, stored.revision, batch=batch)

    async def _append(
        self, state: TaskState, revision: int, *, batch: bool = False
    ) -> StoredState | None:
        data = codec.encode_map(record_map(state, revision))
        if state.outcome and state.outcome.get("usage") and not state.usage_reported:
            state = state.model_copy(update={"usage_reported": True})
        ack = await self._connection.append(
            record_subject(state.state, state.role, state.task_id),
            data,
            msg_id=f"{state.task_id}_{state.state}_{revision}",
            last_seq=revision,
            on=records_of(state.task_id, state.role),
            batch=batch,
        )
        if ack is None:
            return None
        if ack.duplicate:
            # A record with this id exists: ours, if an earlier try of this very
            # append was stored (its answer lost); or another delivery's, which
            # wrote first from the same record. Only the bytes tell.
            newest = await self._connection.streams.last(
                EVENTS_STREAM, records_of(state.task_id, state.role)
            )
            if newest is None or newest.seq != ack.seq or newest.data != data:
                return None
        return StoredState(state, ack.seq)

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
            written = await self._append(state, 0 if current is None else current.revision)
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
