"""Escalations: who decides, the open-escalation records, and timeouts up the chart.

An escalation parks a task (state ``input-required``) until a decision comes
back. Its record in the ``rolebus_escalations`` bucket says who holds it now and
whether it is still open; every change is a compare-and-set.

Timeouts survive restarts of workers and server because the server keeps them:
with each escalation a *scheduled message* (NATS 2.12 message schedules) is
stored in ``ROLEBUS_TIMERS`` holding the same escalation one level up
``reports_to``; at the deadline the server publishes it on ``timer.fired.>``,
where the supervisor (:mod:`rolebus.worker.supervisor`, run by every worker process on
one shared durable consumer) sends it on as ``escalation.<next role>.<reason>``
if the record still says it is open at that level. Otherwise it is stale and
dropped.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from rolebus.errors import ConfigError, NotFoundError, RoleError
from rolebus.flows.effects import Effect, effect, publish_effects
from rolebus.flows.escalation_records import (
    DEFAULT_TIMEOUT,
    EscalationRecord,
    EscalationStore,
    StoredEscalation,
    climb_target,
)
from rolebus.nats.connection import Connection
from rolebus.team.roles import PERSON, NeverRule, RoleSpec, Team
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Escalation, Event, Task, utc_now
from rolebus.wire.subjects import (
    decision_subject,
    escalation_subject,
    event_subject,
    timer_subjects,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "EscalationRecord",
    "EscalationStore",
    "StoredEscalation",
    "boundary_for",
    "climb",
    "climb_target",
    "climbed",
    "decision_effects",
    "decision_from_result",
    "escalation_event",
    "escalation_item",
    "record_for",
    "resolve",
    "resolve_target",
    "schedule_headers",
    "timeout_for",
    "timer_effects",
    "timer_for",
]


def boundary_for(role: RoleSpec, kind: str) -> NeverRule | None:
    """The role's ``never`` rule that a task of ``kind`` hits, if any."""
    return role.never_rule_for(kind)


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


def decision_effects(record: EscalationRecord, team: Team) -> list[Effect]:
    """The decision message back to the asker, and the escalation's event."""
    decision = Decision(
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
    await publish_effects(connection, decision_effects(decided, team), trace=None)
    return decided


def record_for(escalation: Escalation, *, kind: str) -> EscalationRecord:
    """A new record for ``escalation``, its deadline ``timeout_s`` from now."""
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
        deadline=utc_now() + timedelta(seconds=timeout),
        correlation_id=escalation.flow_id,
        trail=[escalation.to_role],
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
    )


def timer_effects(team: Team, escalation: Escalation, record: EscalationRecord) -> list[Effect]:
    """The scheduled message that climbs this level at the record's deadline."""
    assert record.deadline is not None
    timer = timer_for(escalation, team, record.deadline)
    if timer is None:
        return []
    subject, headers, copy = timer
    return [effect(subject, copy, msg_id=f"{escalation.id}-t{escalation.level}", headers=headers)]


def escalation_event(
    role: str,
    record: EscalationRecord,
    state: str,
    *,
    writer: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Effect:
    """The escalation's event: about ``role``, written by ``writer`` (``role`` unless
    given), under whose token it lands."""
    event = Event(
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


async def climb(
    store: EscalationStore, team: Team, escalation: Escalation
) -> tuple[EscalationRecord, list[Effect]] | None:
    """Record that ``escalation`` (the copy one level up, from a fired timer) now
    waits on its ``to_role`` (a person above the top of the chart), and the effects
    that say so: the ``climbed`` event, the escalation sent to its new holder, the
    next level's timer. None when the timer is stale (decided, or climbed past).

    Idempotent: a timer redelivered after the record changed gets the same effects
    (the same Msg-Ids) and sends what a crash may have left unsent."""
    while True:
        found = await store.get(escalation.id)
        if found is None or found.record.status != "open":
            return None
        record = found.record
        if record.level == escalation.level - 1:
            deadline = (
                None
                if escalation.to_role == PERSON
                else utc_now() + timedelta(seconds=record.timeout_s)
            )
            changed = await store.change(
                found,
                holder=escalation.to_role,
                level=escalation.level,
                deadline=deadline,
                trail=[*record.trail, escalation.to_role],
            )
            if changed is None:
                continue  # it moved meanwhile: look again
            record = changed.record
        elif (record.level, record.holder) != (escalation.level, escalation.to_role):
            return None
        effects = [
            escalation_event(
                escalation.to_role,
                record,
                "climbed",
                writer=store.writer,
                detail={"timeout_at": record.trail[-2] if len(record.trail) > 1 else None},
            )
        ]
        if escalation.to_role != PERSON:
            effects.append(
                effect(
                    escalation_subject(escalation.to_role, escalation.reason, sender=store.writer),
                    escalation,
                    msg_id=f"{escalation.id}-l{escalation.level}",
                )
            )
        if record.deadline is not None:
            effects += timer_effects(team, escalation, record)
        return record, effects


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
