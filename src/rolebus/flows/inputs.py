"""What can reach a task: the inputs of :func:`rolebus.flows.lifecycle.step`, as data.

Each carries what the rules need, time included (the lifecycle reads no clock)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from rolebus.flows.actions import Message
from rolebus.flows.record import TaskState
from rolebus.team.roles import NeverRule

__all__ = [
    "INPUTS",
    "Answer",
    "Breach",
    "Cancelled",
    "Completed",
    "Decided",
    "Delivered",
    "Ending",
    "Escalated",
    "Failed",
    "GaveUp",
    "HandedOver",
    "Input",
    "Invalid",
    "OutboxStored",
    "OutboxStuck",
    "Refused",
    "Stale",
]


@dataclass(frozen=True, kw_only=True)
class Delivered:
    """A work item arrives (a task, a contract to review, an escalation to decide):
    a first delivery, or a redelivery after a crash or a nak."""

    #: The record a claim by this delivery starts from (built from the item).
    claim: TaskState
    now: datetime
    last_try: bool = False
    #: The role's ``never`` rule for this kind of task, if it has one.
    boundary: NeverRule | None = None
    #: Why ``rolebus cancel`` asked to stop the task (None: it did not).
    cancelled: str | None = None


@dataclass(frozen=True, kw_only=True)
class Decided:
    """The decision on the escalation a task is parked behind arrives (what was
    decided and by whom come from the escalation's record, not the message)."""

    escalation_id: str
    #: The escalation asked for an approval (not a question).
    approval: bool
    approved: bool | None
    decided_by: str
    text: str
    #: The decision as it is kept in the record (the handler sees it when resumed).
    decision: Mapping[str, Any]
    #: The escalation's reason: an approved ``budget`` is granted by the ledger before
    #: the task resumes, an approved ``brake`` widens the bound it met.
    reason: str
    #: The record to write when the task has none (it is dead-lettered under it).
    orphan: TaskState
    now: datetime
    attempt: int
    last_try: bool = False
    cancelled: str | None = None


@dataclass(frozen=True, kw_only=True)
class Answer:
    """What a handler's attempt answered (kept in the record for ``rolebus rerun``)."""

    now: datetime
    attempt: int
    outcome: Mapping[str, Any] | None = None
    #: The record's message count the answer's messages were numbered from (None:
    #: it sends no numbered message).
    numbered_from: int | None = None
    #: The subject of the delivery that ran (None: not known): a record under another
    #: subject belongs to another message that took the same task id.
    subject: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ending(Answer):
    result: Any = None
    error: str | None = None
    effects: tuple[Message, ...] = ()
    #: The record's message count after this answer (None: unchanged).
    sent: int | None = None
    detail: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Completed(Ending):
    """The handler completed (an answer to a handoff, a decision taken or passed up)."""


@dataclass(frozen=True, kw_only=True)
class HandedOver(Ending):
    """A ``handoff`` boundary: the task goes to another role instead."""


@dataclass(frozen=True, kw_only=True)
class Refused(Ending):
    """A ``refuse`` boundary: the role never does this."""


@dataclass(frozen=True, kw_only=True)
class Cancelled(Ending):
    """``rolebus cancel`` stopped the task (before its handler ran, or during it)."""


@dataclass(frozen=True, kw_only=True)
class Escalated(Answer):
    """The task waits for someone: its handler escalated, or an ``approval``
    boundary asks first. The escalation is already open in its store."""

    escalation_id: str
    to: str
    reason: str
    effects: tuple[Message, ...]
    sent: int
    #: The input a decision resumes (``{"subject", "message"}``).
    source: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Breach(Escalated):
    """A bound was met (a budget cap, a brake on a loop the model drives): the task
    waits for an approval the bus asked for, with amounts it computed. Only the bus
    makes this input; a handler's answer that claims one is refused."""


@dataclass(frozen=True, kw_only=True)
class Failed(Answer):
    """The handler failed: retried with a delay while attempts remain and the failure
    is retryable, dead-lettered otherwise."""

    error: str
    retryable: bool
    max_deliver: int
    delay: float


@dataclass(frozen=True, kw_only=True)
class Invalid:
    """The message cannot be run: it does not decode, disagrees with its subject,
    names an escalation that does not exist, cannot be resumed."""

    #: The record to write when the task has none.
    orphan: TaskState
    reason: str
    error: str
    attempt: int
    stream_seq: int
    now: datetime


@dataclass(frozen=True, kw_only=True)
class GaveUp(Invalid):
    """The server gave up redelivering it (``max_deliver``): nothing is left to ack."""


@dataclass(frozen=True, kw_only=True)
class Stale:
    """A message that is out of date (an escalation decided or climbed meanwhile, a
    decision for another escalation): it changes nothing."""

    why: str


@dataclass(frozen=True, kw_only=True)
class OutboxStuck:
    """The record's outbox could not all be stored (a full stream, the server away):
    the record must say so (the task is done, its follow-ups wait) before the
    delivery comes again."""

    error: str
    now: datetime


@dataclass(frozen=True, kw_only=True)
class OutboxStored:
    """An outbox the record said was stuck is stored now."""

    now: datetime


Input = (
    Delivered
    | Decided
    | Completed
    | HandedOver
    | Refused
    | Cancelled
    | Escalated
    | Breach
    | Failed
    | Invalid
    | GaveUp
    | Stale
    | OutboxStuck
    | OutboxStored
)
#: Every kind of input, in the order the table lists them.
INPUTS: Final = (
    Delivered,
    Decided,
    Completed,
    HandedOver,
    Refused,
    Cancelled,
    Escalated,
    Breach,
    Failed,
    Invalid,
    GaveUp,
    Stale,
    OutboxStuck,
    OutboxStored,
)
