"""Escalations, carried out: a person's decision (the CLI, the dashboard) and a
fired timer's climb. What they write and send is decided by
:mod:`rolebus.flows.escalation_rules`; the records are
:mod:`rolebus.flows.escalation_store`'s.
"""

from __future__ import annotations

from rolebus.errors import ConfigError, NotFoundError
from rolebus.flows.effects import publish_effects
from rolebus.flows.escalation_record import EscalationRecord
from rolebus.flows.escalation_rules import decision_effects, timer_climb
from rolebus.flows.escalation_store import EscalationStore
from rolebus.flows.outbox import Effect
from rolebus.nats.connection import Connection
from rolebus.team.roles import PERSON, Team
from rolebus.wire.messages import Escalation, utc_now

#: The store and its records, for the CLI, the dashboard and the readers of history.
__all__ = ["EscalationRecord", "EscalationStore", "climb_fired", "resolve"]


async def resolve(
    connection: Connection,
    team: Team,
    escalation_id: str,
    *,
    decision: str,
    approved: bool | None,
    decided_by: str = PERSON,
) -> EscalationRecord:
    """Answer an open escalation (as a person): close its record and send the
    decision to the role that asked, which resumes the parked task."""
    store = EscalationStore(connection, writer=decided_by, team=team)
    record = (await store.require(escalation_id)).record
    if record.kind == "approval" and approved is None:
        raise ConfigError(
            f"escalation {escalation_id} asks for an approval",
            hint="answer with --approve or --reject (and --decision saying why)",
        )
    decided = await store.decide(
        escalation_id, decision=decision, approved=approved, decided_by=decided_by
    )
    if decided is None:
        closed = (await store.require(escalation_id)).record
        raise NotFoundError(
            f"escalation {escalation_id} is already {closed.status} "
            f"(by {closed.decided_by}: {closed.decision!r})",
            hint="`rolebus escalations` lists the open ones",
        )
    effects = decision_effects(decided, team, now=utc_now())
    await publish_effects(connection, effects, trace=None)
    return decided


async def climb_fired(store: EscalationStore, team: Team, copy: Escalation) -> list[Effect] | None:
    """Record that ``copy`` (the escalation one level up, from a fired timer) now
    waits on its ``to_role``; the messages that say so, to publish. None when the
    timer is stale (decided, or climbed past). Idempotent: a redelivered timer gets
    the same messages (the same Msg-Ids)."""
    while True:
        stored = await store.get(copy.id)
        decided = timer_climb(stored, copy, writer=store.writer, team=team, now=utc_now())
        if decided is None:
            return None
        if stored is None or decided.proposed is None:
            return decided.effects
        if await store.write_step(stored, decided.proposed) is not None:
            return decided.effects
        # It moved meanwhile: look again.
