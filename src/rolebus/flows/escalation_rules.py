"""Escalations, decided: who an escalation goes to, the record it opens, the
messages that ask, climb and answer it (pure: the stores write, the shells publish).

An escalation parks a task (state ``input-required``) until a decision comes back.
Its record (:mod:`rolebus.flows.escalation_record`) says who holds it now and
whether it is still open; every change is a compare-and-set
(:mod:`rolebus.flows.escalation_store`).

Timeouts survive restarts of workers and server because the server keeps them:
with each escalation a *scheduled message* (NATS 2.12 message schedules) is stored
in ``ROLEBUS_TIMERS`` holding the same escalation one level up ``reports_to``; at
the deadline the server publishes it on ``timer.fired.>``, where the supervisor
sends it on as ``escalation.<next role>.<reason>`` if the record still says it is
open at that level. Otherwise it is stale and dropped. :func:`climb` is the one
climb, for a timer and for a holder that passes the question on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rolebus.errors import RoleError
from rolebus.flows.escalation_record import (
    DEFAULT_TIMEOUT,
    EscalationRecord,
    StoredEscalation,
    chain_above,
    chain_after,
    climb_target,
)
from rolebus.flows.outbox import Effect, effect
from rolebus.team.roles import PERSON, RoleSpec, Team
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Escalation, Event, Task
from rolebus.wire.subjects import (
    decision_subject,
    escalation_subject,
    event_subject,
    timer_subjects,
)

__all__ = [
    "Climb",
    "climb",
    "climbed",
    "decision_effects",
    "decision_from_result",
    "escalation_event",
    "escalation_item",
    "pass_on",
    "record_for",
    "resolve_target",
    "schedule_headers",
    "timeout_for",
    "timer_climb",
    "timer_effects",
    "timer_for",
]


def resolve_target(team: Team, role: RoleSpec, reason: str, to: str | None) -> str:
    """Who an escalation from ``role`` goes to: the handler's choice, else the role's
    rule for the reason, else the role it reports to, else a person."""
    if to is not None:
        if to != PERSON and to not in team.roles:
            raise RoleError(
                f"escalation to role {to!r}, which does not exist",
                file=role.source,
                hint=f"known roles: {', '.join(sorted(team.roles))} (or 'person')",
            )
        return to
    rule = role.escalation_rule_for(reason)
    if rule is not None:
        return rule.to
    return role.reports_to or PERSON


def timeout_for(role: RoleSpec, reason: str) -> float:
    rule = role.escalation_rule_for(reason)
    return rule.timeout if rule is not None else DEFAULT_TIMEOUT


def schedule_headers(deadline: datetime, target_subject: str) -> dict[str, str]:
    """Headers that make the server publish a message at ``deadline`` on the target."""
    # Schedules have one-second resolution; round up so it never fires early.
    at = (deadline + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {Header.SCHEDULE: f"@at {at}", Header.SCHEDULE_TARGET: target_subject}


def climbed(escalation: Escalation, team: Team) -> Escalation | None:
    """The copy of ``escalation`` one level up: to ``reports_to``, and above the top
    of the chart to a person (None once a person holds it)."""
    if escalation.to_role == PERSON:
        return None
    target = climb_target(team, escalation.to_role)
    return escalation.model_copy(update={"to_role": target, "level": escalation.level + 1})


def timer_for(
    escalation: Escalation, team: Team, deadline: datetime
) -> tuple[str, dict[str, str], Escalation] | None:
    """The scheduled message that climbs ``escalation`` at ``deadline``: its subject,
    headers and body (None once a person holds it: nobody above waits)."""
    copy = climbed(escalation, team)
    if copy is None:
        return None
    schedule, fired = timer_subjects(escalation.id, escalation.level)
    return schedule, schedule_headers(deadline, fired), copy


def decision_effects(record: EscalationRecord, team: Team, *, now: datetime) -> list[Effect]:
    """The decision message back to the asker, and the escalation's event."""
    decision = Decision(
        created_at=now,
        id=f"{record.id}-decision",
        escalation_id=record.id,
        to_role=record.asking_role,
        decision=record.decision or "",
        approved=record.approved,
        task_id=record.task_id,
        decided_by=record.decided_by or PERSON,
        from_role=record.decided_by,
        correlation_id=record.correlation_id,
        causation_id=record.id,
    )
    event = Event(
        created_at=now,
        at=now,
        id=f"{record.id}_decided",
        entity="escalation",
        state="decided",
        task_id=record.task_id or record.id,
        role=record.decided_by,
        correlation_id=record.correlation_id,
        causation_id=record.id,
        detail={
            "escalation_id": record.id,
            "decision": record.decision,
            "approved": record.approved,
            "decided_by": record.decided_by,
            "kind": record.kind,
            "reason": record.reason,
            "level": record.level,
        },
    )
    decider = record.decided_by or PERSON
    effects = [effect(event_subject("escalation", "decided", writer=decider), event)]
    if record.asking_role in team.roles:
        effects.insert(
            0,
            effect(
                decision_subject(record.asking_role, record.id, sender=record.decided_by),
                decision,
            ),
        )
    return effects


def record_for(
    escalation: Escalation, *, kind: str, now: datetime, team: Team | None = None
) -> EscalationRecord:
    """A new record for ``escalation``, its deadline ``timeout_s`` after ``now`` (with
    the ``team``, the chain its timeouts climb)."""
    timeout = escalation.timeout_s or DEFAULT_TIMEOUT
    return EscalationRecord(
        id=escalation.id,
        task_id=escalation.task_id,
        asking_role=escalation.from_role or PERSON,
        holder=escalation.to_role,
        reason=escalation.reason,
        question=escalation.question,
        options=escalation.options,
        kind=kind,  # type: ignore[arg-type]
        level=escalation.level,
        timeout_s=timeout,
        deadline=now + timedelta(seconds=timeout),
        opened_at=now,
        correlation_id=escalation.flow_id,
        trail=[escalation.to_role],
        chain=chain_above(team, escalation.to_role) if team is not None else [],
    )


def escalation_item(escalation: Escalation, record: EscalationRecord) -> Task:
    """What the deciding role's handler sees: the question, its options, who asks."""
    return Task(
        id=f"{escalation.id}-l{escalation.level}",
        kind="escalation",
        title=escalation.question,
        payload={
            "escalation_id": escalation.id,
            "reason": escalation.reason,
            "question": escalation.question,
            "options": [option.model_dump() for option in escalation.options],
            "asking_role": escalation.from_role,
            "task_id": escalation.task_id,
            "level": escalation.level,
            "approval": record.kind == "approval",
        },
        from_role=escalation.from_role,
        correlation_id=escalation.flow_id,
        causation_id=escalation.id,
        created_at=escalation.created_at,
    )


def timer_effects(team: Team, escalation: Escalation, record: EscalationRecord) -> list[Effect]:
    """The scheduled message that climbs this level at the record's deadline (none
    without a deadline: a person holds it, and nobody above waits)."""
    timer = None if record.deadline is None else timer_for(escalation, team, record.deadline)
    if timer is None:
        return []
    subject, headers, copy = timer
    return [effect(subject, copy, msg_id=f"{escalation.id}-t{escalation.level}", headers=headers)]


def escalation_event(
    role: str,
    record: EscalationRecord,
    state: str,
    *,
    now: datetime,
    writer: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Effect:
    """The escalation's event: about ``role``, written by ``writer`` (``role`` unless
    given), under whose token it lands."""
    event = Event(
        created_at=now,
        at=now,
        id=f"{record.id}_{state}_{record.level}",
        entity="escalation",
        state=state,
        task_id=record.task_id or record.id,
        role=role,
        correlation_id=record.correlation_id,
        causation_id=record.id,
        detail={
            "escalation_id": record.id,
            "to": record.holder,
            "from": record.asking_role,
            "level": record.level,
            "reason": record.reason,
            "question": record.question,
            "kind": record.kind,
            **(detail or {}),
        },
    )
    return effect(event_subject("escalation", state, writer=writer or role), event)


@dataclass(frozen=True)
class Climb:
    """A climb decided: the record's next step (None: it is written already) and the
    messages that say so (the climbed event, the escalation to its new holder, the
    next level's timer)."""

    proposed: EscalationRecord | None
    effects: list[Effect]


def climb(
    current: EscalationRecord,
    copy: Escalation,
    *,
    writer: str,
    team: Team,
    deadline: datetime | None,
    about: str,
    detail: dict[str, Any],
    now: datetime,
) -> Climb:
    """The one climb: ``current`` now waits on ``copy.to_role`` at ``copy.level``
    (a person above the top of the chart), recorded by ``writer``."""
    to = copy.to_role
    proposed = current.model_copy(
        update={
            "holder": to,
            "level": copy.level,
            "deadline": deadline,
            "trail": [*current.trail, to],
            "chain": chain_after(current, writer, to, team),
        }
    )
    effects = _climb_effects(
        proposed, copy, writer=writer, team=team, about=about, detail=detail, now=now
    )
    return Climb(proposed, effects)


def _climb_effects(
    record: EscalationRecord,
    copy: Escalation,
    *,
    writer: str,
    team: Team,
    about: str,
    detail: dict[str, Any],
    now: datetime,
) -> list[Effect]:
    effects = [escalation_event(about, record, "climbed", now=now, writer=writer, detail=detail)]
    if copy.to_role != PERSON:
        effects.append(
            effect(
                escalation_subject(copy.to_role, copy.reason, sender=writer),
                copy,
                msg_id=f"{copy.id}-l{copy.level}",
            )
        )
    if record.deadline is not None:
        effects += timer_effects(team, copy, record)
    return effects


def timer_climb(
    stored: StoredEscalation | None, copy: Escalation, *, writer: str, team: Team, now: datetime
) -> Climb | None:
    """A fired timer (or a copy that arrived before its climb was recorded): the
    escalation climbs to ``copy``'s level, if it is still open one level below; the
    same messages again if it climbed there already (a redelivered timer sends what a
    crash may have left unsent); None when the timer is stale."""
    if stored is None or stored.record.status != "open":
        return None
    record = stored.record
    detail: dict[str, Any] = {"timeout_at": record.holder}
    if record.level == copy.level - 1:
        deadline = None if copy.to_role == PERSON else now + timedelta(seconds=record.timeout_s)
        return climb(
            record,
            copy,
            writer=writer,
            team=team,
            deadline=deadline,
            about=copy.to_role,
            detail=detail,
            now=now,
        )
    if (record.level, record.holder) != (copy.level, copy.to_role):
        return None
    detail = {"timeout_at": record.trail[-2] if len(record.trail) > 1 else None}
    effects = _climb_effects(
        record, copy, writer=writer, team=team, about=copy.to_role, detail=detail, now=now
    )
    return Climb(None, effects)


def pass_on(
    stored: StoredEscalation | None,
    escalation: Escalation,
    *,
    to: str,
    why: str,
    writer: str,
    team: Team,
    now: datetime,
) -> Climb | None:
    """The holder does not know either: it passes ``escalation`` one level up (to
    ``to``); None when it moved meanwhile (decided, or passed on already)."""
    if stored is None or stored.record.status != "open" or stored.record.level != escalation.level:
        return None
    record = stored.record
    copy = escalation.model_copy(update={"to_role": to, "level": escalation.level + 1})
    deadline = now + timedelta(seconds=record.timeout_s)
    return climb(
        record,
        copy,
        writer=writer,
        team=team,
        deadline=deadline,
        about=writer,
        detail={"why": why},
        now=now,
    )


def decision_from_result(result: Any) -> tuple[str, bool | None]:
    """A deciding handler's result: ``{"decision": text, "approved": bool}``, or text."""
    if isinstance(result, dict):
        text = result.get("decision")
        approved = result.get("approved")
        return (
            str(text) if text is not None else json.dumps(result, default=str, sort_keys=True),
            approved if isinstance(approved, bool) else None,
        )
    return (str(result) if result is not None else "decided", None)
