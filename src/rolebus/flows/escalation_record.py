"""An escalation's record, and who may take each step of it (pure: no I/O).

An escalation's history is kept in the ``rolebus_escalations`` bucket as one key
per step, ``e.<writer>.<escalation id>.<step>``: step 0 opens it, each climb and
the decision are the next steps, and each value is the whole record as its writer
proposes it. A role's user may write only keys with its own token, so no role can
write a step in another's name; and a reader takes a step only if its writer may
take it (:func:`allowed`): the asker (or the holder) opens, the holder or the
timer climbs, the holder or a person decides. Of two writers at one step, the
first stored that is allowed wins. So no role can decide an escalation it does
not hold, or rewrite one that was decided.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rolebus.team.roles import PERSON, Team
from rolebus.wire.messages import EscalationOption, Instant, utc_now

__all__ = [
    "DEFAULT_TIMEOUT",
    "EscalationRecord",
    "StoredEscalation",
    "allowed",
    "chain_above",
    "chain_after",
    "climb_target",
]

#: Who decides when nobody above in the chart does.
DEFAULT_TIMEOUT = 3600.0

#: What a climb may change, and what a decision may.
_CLIMB = {"holder", "level", "trail", "deadline", "chain"}
_DECISION = {"status", "decision", "approved", "decided_by", "decided_at"}


class EscalationRecord(BaseModel):
    """An escalation's current state."""

    model_config = ConfigDict(extra="allow")

    id: str
    task_id: str | None
    asking_role: str
    holder: str
    reason: str
    question: str
    options: list[EscalationOption] = Field(default_factory=list)
    kind: Literal["question", "approval"] = "question"
    level: int = 0
    status: Literal["open", "decided"] = "open"
    timeout_s: float = DEFAULT_TIMEOUT
    deadline: Instant | None = None
    opened_at: Instant = Field(default_factory=utc_now)
    decision: str | None = None
    approved: bool | None = None
    decided_by: str | None = None
    decided_at: Instant | None = None
    correlation_id: str | None = None
    trail: list[str] = Field(default_factory=list)
    #: Who the timeouts pass it to from this level on (recorded by whoever opened
    #: it or passed it on: a timeout recorded by anyone else must follow it).
    chain: list[str] = Field(default_factory=list)

    def current_holder(self, team: Team, now: datetime | None = None) -> str:
        """Who must answer now: past the deadline at the top of the chart, a person."""
        if self.status != "open" or self.holder == PERSON:
            return self.holder
        expired = self.deadline is not None and (now or utc_now()) > self.deadline
        top = self.holder in team.roles and team.roles[self.holder].reports_to is None
        return PERSON if expired and top else self.holder


class StoredEscalation(BaseModel):
    record: EscalationRecord
    #: The record's step (0: opened); the next write is step ``revision + 1``.
    revision: int


def allowed(
    writer: str, current: EscalationRecord | None, proposed: EscalationRecord, stored_at: datetime
) -> str | None:
    """Why ``writer`` may not take this step (None: it may)."""
    if current is None:
        if proposed.status != "open" or proposed.level != 0:
            return "a first step must open the escalation"
        if writer not in (proposed.asking_role, proposed.holder, PERSON):
            return f"{writer} neither asks nor holds it"
        return None
    if current.status != "open":
        return "it is decided already"
    before = current.model_dump(exclude=_CLIMB | _DECISION)
    if proposed.model_dump(exclude=_CLIMB | _DECISION) != before:
        return "a step may change only who holds it, or its decision"
    if proposed.status == "decided":
        if proposed.model_dump(include=_CLIMB) != current.model_dump(include=_CLIMB):
            return "a decision may not move it"
        if proposed.decided_by != writer:
            return f"decided_by {proposed.decided_by!r} is not its writer {writer!r}"
        if writer not in (current.holder, PERSON):
            return f"{writer} does not hold it ({current.holder} does)"
        return None
    if proposed.level != current.level + 1:
        return f"a climb goes to level {current.level + 1}, not {proposed.level}"
    if writer in (current.holder, PERSON):
        return None  # the holder passes it on (to whom it chooses), or a person does
    # Anyone else records a timeout: only after the deadline, and only up the chain
    # the level started with.
    if current.deadline is None or stored_at < current.deadline:
        return f"{writer} does not hold it and its deadline has not passed"
    if not current.chain or proposed.holder != current.chain[0]:
        return f"a timeout climbs to {current.chain[:1] or 'nobody'}, not {proposed.holder!r}"
    if proposed.chain != current.chain[1:]:
        return "a timeout keeps the chain above"
    return None


def climb_target(team: Team, holder: str) -> str:
    """One step up the chart from ``holder`` (a person above the top)."""
    if holder == PERSON or holder not in team.roles:
        return PERSON
    return team.roles[holder].reports_to or PERSON


def chain_above(team: Team, holder: str) -> list[str]:
    """Who the timeouts pass an escalation held by ``holder`` to, in order."""
    chain: list[str] = []
    while holder != PERSON and len(chain) <= len(team.roles):
        holder = climb_target(team, holder)
        chain.append(holder)
    return chain


def chain_after(
    current: EscalationRecord, writer: str, holder: str, team: Team | None
) -> list[str]:
    """The chain a climb to ``holder`` records: whom the holder (or a person) passes
    it to decides the new chain; a timeout, recorded by anyone else, keeps the chain
    the level started with, one step on."""
    if holder == current.holder:
        return current.chain
    if writer in (current.holder, PERSON) and team is not None:
        return chain_above(team, holder)
    return current.chain[1:]
