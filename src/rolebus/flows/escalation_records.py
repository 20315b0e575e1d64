"""Escalation records, each write under its writer's token.

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

from collections import defaultdict
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from rolebus.errors import CodecError, NotFoundError
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import KvChange
from rolebus.team.roles import PERSON, Team
from rolebus.wire import codec
from rolebus.wire.messages import EscalationOption, Instant, utc_now
from rolebus.wire.subjects import ESCALATIONS_BUCKET, validate_token

__all__ = [
    "DEFAULT_TIMEOUT",
    "EscalationRecord",
    "EscalationStore",
    "StoredEscalation",
    "allowed",
    "chain_above",
    "climb_target",
]

log = structlog.get_logger("rolebus.flows.escalation_records")

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


class EscalationStore:
    """Escalation records for ``writer`` (a role id, or ``person`` for the CLI and
    the dashboard, whose user is the operator). A writer that opens or passes on an
    escalation gives the ``team``: the chain its timeouts climb is recorded then."""

    def __init__(
        self, connection: Connection, *, writer: str = PERSON, team: Team | None = None
    ) -> None:
        self._connection = connection
        self.writer = writer
        self._team = team

    async def _steps(self, escalation_id: str = "*") -> dict[str, list[KvChange]]:
        by_id: dict[str, list[KvChange]] = defaultdict(list)
        async for change in self._connection.kv.changes(
            ESCALATIONS_BUCKET, keys=f"e.*.{escalation_id}.*"
        ):
            if change.value is not None:
                by_id[change.key.split(".")[2]].append(change)
        return by_id

    @staticmethod
    def _compose(steps: list[KvChange]) -> StoredEscalation | None:
        current: EscalationRecord | None = None
        step = -1
        for change in sorted(steps, key=lambda c: (int(c.key.split(".")[3]), c.seq)):
            _, writer, escalation_id, number = change.key.split(".")
            if int(number) != step + 1:
                continue  # a second writer at a step already taken, or a gap
            try:
                proposed = codec.decode_as(EscalationRecord, change.value or b"")
            except CodecError:
                continue
            why = ("its id is not its key's" if proposed.id != escalation_id else None) or allowed(
                writer, current, proposed, change.time
            )
            if why is not None:
                # Every read composes the steps again: at debug level, or a forged
                # step would be logged on each refresh of the inbox.
                log.debug("escalation step ignored", key=change.key, why=why)
                continue
            current, step = proposed, step + 1
        return None if current is None else StoredEscalation(record=current, revision=step)

    async def get(self, escalation_id: str) -> StoredEscalation | None:
        validate_token(escalation_id, what="escalation id")
        return self._compose((await self._steps(escalation_id)).get(escalation_id, []))

    async def require(self, escalation_id: str) -> StoredEscalation:
        stored = await self.get(escalation_id)
        if stored is None:
            raise NotFoundError(
                f"no escalation {escalation_id!r}",
                hint="`rolebus escalations` lists the open ones",
            )
        return stored

    async def _write(self, record: EscalationRecord, step: int) -> StoredEscalation | None:
        """Propose ``record`` as step ``step``; it, if it is the step now."""
        key = f"e.{self.writer}.{record.id}.{step}"
        await self._connection.kv.create(ESCALATIONS_BUCKET, key, codec.encode(record))
        now = await self.get(record.id)
        if now is None or now.revision < step:
            return None
        same = now.record.model_dump(mode="json") == record.model_dump(mode="json")
        return now if now.revision == step and same else None

    async def open(self, record: EscalationRecord) -> EscalationRecord:
        """Store a new escalation (idempotent: an existing record is returned)."""
        existing = await self.get(record.id)
        if existing is not None:
            return existing.record
        if self._team is not None:
            record = record.model_copy(update={"chain": chain_above(self._team, record.holder)})
        opened = await self._write(record, 0)
        return opened.record if opened is not None else (await self.require(record.id)).record

    async def change(self, stored: StoredEscalation, **changes: Any) -> StoredEscalation | None:
        """The next step (a climb, or the decision); None if another one came first."""
        current = stored.record
        holder = changes.get("holder", current.holder)
        if holder != current.holder:
            if self.writer in (current.holder, PERSON) and self._team is not None:
                changes["chain"] = chain_above(self._team, holder)
            else:  # a timeout: one up the chain the level started with
                changes["chain"] = current.chain[1:]
        return await self._write(current.model_copy(update=changes), stored.revision + 1)

    async def decide(
        self,
        escalation_id: str,
        *,
        decision: str,
        approved: bool | None,
        decided_by: str,
        as_holder: bool = False,
    ) -> EscalationRecord | None:
        """Close an open escalation with its decision; None when it is unknown,
        someone decided first, or (``as_holder``: a role's handler answering) it
        has climbed past ``decided_by`` meanwhile. A person may always decide."""
        found = await self.get(escalation_id)
        while found is not None and found.record.status == "open":
            if as_holder and found.record.holder != decided_by:
                return None
            decided = await self.change(
                found,
                status="decided",
                decision=decision,
                approved=approved,
                decided_by=decided_by,
                decided_at=utc_now(),
            )
            if decided is not None:
                return decided.record
            found = await self.get(escalation_id)
        return None

    async def all(self) -> list[EscalationRecord]:
        composed = [self._compose(steps) for steps in (await self._steps()).values()]
        return [stored.record for stored in composed if stored is not None]
