"""Escalation records in the ``rolebus_escalations`` bucket, each write under its
writer's token (see :mod:`rolebus.flows.escalation_record` for the record and who
may take each step).

An escalation's history is one key per step, ``e.<writer>.<escalation id>.<step>``:
step 0 opens it, each climb and the decision are the next steps, and each value is
the whole record as its writer proposes it. A role's user may write only keys with
its own token, so no role can write a step in another's name; a reader takes a step
only if its writer may take it; of two writers at one step, the first stored that is
allowed wins.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import structlog

from rolebus.errors import CodecError, NotFoundError
from rolebus.flows.escalation_record import (
    EscalationRecord,
    StoredEscalation,
    allowed,
    chain_above,
    chain_after,
)
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import KvChange
from rolebus.team.roles import PERSON, Team
from rolebus.wire import codec
from rolebus.wire.messages import utc_now
from rolebus.wire.subjects import ESCALATIONS_BUCKET, validate_token

__all__ = ["EscalationStore"]

log = structlog.get_logger("rolebus.flows.escalation_store")


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
        changes["chain"] = chain_after(current, self.writer, holder, self._team)
        return await self._write(current.model_copy(update=changes), stored.revision + 1)

    async def write_open(self, record: EscalationRecord) -> StoredEscalation | None:
        """Store ``record`` as the escalation's first step (its chain as given); None
        when another first step came first (read, and decide again)."""
        return await self._write(record, 0)

    async def write_step(
        self, stored: StoredEscalation, proposed: EscalationRecord
    ) -> StoredEscalation | None:
        """Store ``proposed`` as the step after ``stored``; None when another step
        came first (read, and decide again)."""
        return await self._write(proposed, stored.revision + 1)

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
        someone decided first, or (``as_holder``: for a role, not a person) it has
        climbed past ``decided_by`` meanwhile. A person may always decide."""
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
