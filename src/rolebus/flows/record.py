"""A task's record: what the bus knows about one task, as it is stored.

Each record is an event on ``event.task.<state>.<role>.<task id>`` in the history
stream (see :mod:`rolebus.flows.state` for how records are appended, and
:mod:`rolebus.flows.lifecycle` for the rules that change them). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from rolebus.wire.messages import EVENT_SCHEMA_VERSION, Event, Instant, utc_now

__all__ = [
    "PARKED",
    "RESUMED",
    "STATES",
    "TERMINAL_STATES",
    "WAITING",
    "Record",
    "State",
    "TaskState",
    "event_detail",
    "record_map",
    "started",
    "state_of",
]


class State(StrEnum):
    """Every stage of a task's life: what its newest record says (``NEW``: it has
    none yet under this role). The one spelling every reader imports."""

    NEW = "new"
    #: Running: its handler has it (never stored alone: a claim is held in memory).
    CLAIMED = "claimed"
    RETRYING = "retrying"
    #: ``rolebus dlq redrive`` put it back.
    REDRIVEN = "redriven"
    #: Parked until a decision arrives: only that decision may run the task again.
    PARKED = "input-required"
    #: A decision arrived and its task runs again: only that decision's delivery may run it.
    RESUMED = "resumed"
    COMPLETED = "completed"
    HANDED_OFF = "handed-off"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    DEAD = "dead"


#: States after which a task never runs again (unless redriven).
TERMINAL_STATES: Final = frozenset(
    {State.COMPLETED, State.DEAD, State.REJECTED, State.HANDED_OFF, State.CANCELLED}
)
PARKED: Final = State.PARKED
RESUMED: Final = State.RESUMED
#: The states in which a task waits for one escalation's decision.
WAITING: Final = frozenset({State.PARKED, State.RESUMED})
#: Every state a task record can be in.
STATES: Final = frozenset(set(State) - {State.NEW})


class TaskState(BaseModel):
    """What the bus knows about one task right now."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    #: A :class:`State` (kept a string: a record from a newer rolebus may name a
    #: state this one does not know, and is still read).
    state: str
    role: str
    subject: str
    kind: str = ""
    title: str = ""
    attempt: int = 0
    stream_seq: int = 0
    correlation_id: str | None = None
    causation_id: str | None = None
    created_at: Instant | None = None
    updated_at: Instant = Field(default_factory=utc_now)
    #: When this attempt's handler started (after the task waited in the backlog).
    started_at: Instant | None = None
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


@dataclass(frozen=True, slots=True)
class Record:
    """A task's newest record as it was read (None: it has none yet under this role)
    and its sequence in the history stream: the compare-and-set's revision (0: none)."""

    state: TaskState | None
    revision: int = 0
