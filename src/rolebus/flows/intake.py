"""What arrived, as a lifecycle input: the first step of every delivery (pure).

:func:`intake` turns a received message and the facts read for it into the input
:func:`~rolebus.flows.lifecycle.step` takes, the record it starts from and the work
item a handler would see. A task or a contract to review is *delivered*; an
escalation is delivered to its holder once its guards pass; a decision *decides*
the task parked behind it; a message that cannot run is *invalid*, an out-of-date
one *stale*. When it needs a fact it was not given (the task's record, the
escalation's), it answers :class:`~rolebus.flows.facts.Needs`, and the shell reads
those and asks again.

An escalation and a decision are checked by guards, in the order of
:data:`ESCALATION_GUARDS` and :data:`DECISION_GUARDS`: the first that holds decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from rolebus.errors import CodecError
from rolebus.flows.escalation_record import EscalationRecord, StoredEscalation
from rolebus.flows.escalation_rules import escalation_item, record_for, timer_climb
from rolebus.flows.facts import Facts, Needs
from rolebus.flows.handoffs import review_item
from rolebus.flows.inputs import Decided, Delivered, GaveUp, Input, Invalid, Stale
from rolebus.flows.preparations import ClimbEscalation, OpenEscalation, Preparation
from rolebus.flows.record import Record, State, TaskState
from rolebus.team.roles import PERSON, RoleSpec, Team
from rolebus.wire import codec
from rolebus.wire.messages import Decision, Envelope, Escalation, Handoff, Task

__all__ = [
    "DECISION_GUARDS",
    "ESCALATION_GUARDS",
    "Intake",
    "Item",
    "Received",
    "gave_up",
    "intake",
    "orphan_of",
]


@dataclass(frozen=True)
class Item:
    """A work item (what the handler sees) and the message it came from."""

    task: Task
    kind: str  # task | handoff | escalation
    source: Envelope


@dataclass(frozen=True)
class Received:
    """One delivery, decoded (or the reason it does not decode)."""

    subject: str
    stream_seq: int
    #: Which delivery of the message this is (1: the first).
    delivered: int
    message: Envelope | CodecError


@dataclass(frozen=True)
class Intake:
    """The input to step, the record it starts from, the item a run would handle,
    and what must be written first."""

    given: Input
    record: Record
    item: Item | None = None
    preparations: tuple[Preparation, ...] = ()


@dataclass(frozen=True)
class _Context:
    received: Received
    facts: Facts
    role: RoleSpec
    team: Team
    cancelled: Mapping[str, str]
    now: datetime


def intake(
    received: Received,
    facts: Facts,
    *,
    role: RoleSpec,
    team: Team,
    cancelled: Mapping[str, str],
    now: datetime,
) -> Intake | Needs:
    """The input ``received`` is (see the module's documentation)."""
    at = _Context(received, facts, role, team, cancelled, now)
    message = received.message
    if isinstance(message, CodecError):
        return _refuse(at, message.kind, message.message)
    mismatch = codec.disagreement(received.subject, message)
    if mismatch is not None:
        return _refuse(at, "invalid", f"refused: the body disagrees with the subject: {mismatch}")
    if isinstance(message, Task):
        return _deliver(at, Item(task=message, kind="task", source=message), boundary=True)
    if isinstance(message, Handoff):
        review = review_item(message)
        return _deliver(at, Item(task=review, kind=review.kind, source=message))
    if isinstance(message, Escalation):
        return _escalation(at, message)
    if isinstance(message, Decision):
        return _decision(at, message)
    return _refuse(at, "invalid", f"{role.id} does not handle {received.subject}")


def gave_up(
    subject: str,
    stream_seq: int,
    task: Task | None,
    *,
    error: str,
    attempts: int,
    facts: Facts,
    role: RoleSpec,
    now: datetime,
) -> Intake | Needs:
    """The server gave up redelivering a message (max deliveries): it is buried."""
    orphan = orphan_of(role, subject, stream_seq, task)
    if needs := facts.lacking(records=(orphan.task_id,)):
        return needs
    given = GaveUp(
        orphan=orphan,
        reason="max-deliver",
        error=error,
        attempt=attempts,
        stream_seq=stream_seq,
        now=now,
    )
    return Intake(given, facts.records[orphan.task_id])


def orphan_of(role: RoleSpec, subject: str, stream_seq: int, task: Task | None) -> TaskState:
    """The record of something that never ran as a task of this role."""
    return TaskState(
        task_id=task.id if task is not None else f"seq-{stream_seq}",
        state=State.CLAIMED,
        role=role.id,
        subject=subject,
        kind=task.kind if task is not None else "",
        title=task.title if task is not None else "",
        stream_seq=stream_seq,
        correlation_id=task.correlation_id if task is not None else None,
        causation_id=task.causation_id if task is not None else None,
        created_at=task.created_at if task is not None else None,
    )


# --- the kinds of message ---------------------------------------------------------------


def _refuse(at: _Context, reason: str, error: str) -> Intake | Needs:
    """A message that cannot run: dead-lettered, named after its place in the work
    stream (it never became a task this role knows)."""
    received = at.received
    orphan = orphan_of(at.role, received.subject, received.stream_seq, None)
    if needs := at.facts.lacking(records=(orphan.task_id,)):
        return needs
    given = Invalid(
        orphan=orphan,
        reason=reason,
        error=error,
        attempt=received.delivered,
        stream_seq=received.stream_seq,
        now=at.now,
    )
    return Intake(given, at.facts.records[orphan.task_id])


def _stale(why: str) -> Intake:
    return Intake(Stale(why=why), Record(None))


def _deliver(
    at: _Context,
    item: Item,
    *,
    boundary: bool = False,
    preparations: tuple[Preparation, ...] = (),
) -> Intake | Needs:
    task, received, role = item.task, at.received, at.role
    # A first delivery is almost always a task never seen before: not even read (its
    # write is conditional on "no record yet" and fails if one exists after all).
    if received.delivered == 1:
        record = Record(None)
    elif needs := at.facts.lacking(records=(task.id,)):
        return needs
    else:
        record = at.facts.records[task.id]
    claim = TaskState(
        task_id=task.id,
        state=State.CLAIMED,
        role=role.id,
        subject=received.subject,
        kind=task.kind,
        title=task.title,
        attempt=received.delivered,
        stream_seq=received.stream_seq,
        correlation_id=task.correlation_id,
        causation_id=task.causation_id,
        created_at=task.created_at,
        started_at=at.now,
        updated_at=at.now,
    )
    given = Delivered(
        claim=claim,
        now=at.now,
        last_try=received.delivered >= role.max_deliver,
        boundary=role.never_rule_for(task.kind) if boundary else None,
        cancelled=at.cancelled.get(task.id),
    )
    return Intake(given, record, item, preparations)


# --- escalations: checked against their own record ----------------------------------------

#: A guard: the escalation's record (and the message) -> why it decides, or None.
Guard = Callable[[Escalation, EscalationRecord, str], str | None]


def _asked_by_another(escalation: Escalation, record: EscalationRecord, role: str) -> str | None:
    # A climbed copy comes from whoever passed it on (its subject's sender): who
    # asked is what the record's first step says.
    if (escalation.from_role or PERSON) == record.asking_role:
        return None
    return (
        f"refused: its from_role is {escalation.from_role!r} but escalation "
        f"{escalation.id} was asked by {record.asking_role}"
    )


def _closed(escalation: Escalation, record: EscalationRecord, role: str) -> str | None:
    if record.status == "open":
        return None
    return f"escalation {escalation.id} is already {record.status}"


def _climbs_on_arrival(escalation: Escalation, record: EscalationRecord, role: str) -> str | None:
    # Sent one level up before its record said so (the supervisor records the climb
    # first; an older one did not): record it the same way, then deliver it.
    if escalation.level == record.level + 1 and escalation.to_role == role:
        return f"escalation {escalation.id} arrived before its climb to level {escalation.level}"
    return None


def _held_elsewhere(escalation: Escalation, record: EscalationRecord, role: str) -> str | None:
    if escalation.level == record.level and record.holder == role:
        return None
    return f"escalation {escalation.id} is held by {record.holder} at level {record.level}"


#: The guards an escalation to decide meets, in order, and what each leads to.
ESCALATION_GUARDS: Final[tuple[tuple[str, Guard, str], ...]] = (
    ("asked by another", _asked_by_another, "invalid"),
    ("closed", _closed, "stale"),
    ("climbs on arrival", _climbs_on_arrival, "climb, then deliver"),
    ("held elsewhere", _held_elsewhere, "stale"),
)


def _escalation(at: _Context, escalation: Escalation) -> Intake | Needs:
    """An escalation to decide: its record says who asked, who holds it, at which
    level; only then is it delivered like a task."""
    if needs := at.facts.lacking(escalations=(escalation.id,)):
        return needs
    stored = at.facts.escalations[escalation.id]
    preparations: tuple[Preparation, ...] = ()
    if stored is None:  # published by someone outside the bus: start its record now
        opened = record_for(escalation, kind="question", now=at.now, team=at.team)
        preparations = (OpenEscalation(opened),)
        stored = StoredEscalation(record=opened, revision=0)
    record = stored.record
    for _name, guard, leads_to in ESCALATION_GUARDS:
        why = guard(escalation, record, at.role.id)
        if why is None:
            continue
        if leads_to == "invalid":
            return _refuse(at, "invalid", why)
        if leads_to == "stale":
            return _stale(why)
        climb = timer_climb(stored, escalation, writer=at.role.id, team=at.team, now=at.now)
        if climb is None or climb.proposed is None:
            return _stale(f"escalation {escalation.id} changed meanwhile")
        preparations += (ClimbEscalation(stored, climb.proposed, tuple(climb.effects)),)
        record = climb.proposed
        break
    task = escalation_item(escalation, record)
    item = Item(task=task, kind="escalation", source=escalation)
    return _deliver(at, item, preparations=preparations)


# --- decisions: what the escalation's record says was decided -----------------------------

#: A decision's guard: its escalation's record (None: unknown) -> why it decides.
DecisionGuard = Callable[[Decision, StoredEscalation | None], str | None]


def _unknown(decision: Decision, stored: StoredEscalation | None) -> str | None:
    if stored is not None and stored.record.task_id is not None:
        return None
    return f"decision for unknown escalation {decision.escalation_id!r}"


def _not_decided(decision: Decision, stored: StoredEscalation | None) -> str | None:
    if stored is None or stored.record.status == "decided":
        return None
    return f"escalation {stored.record.id} is not decided: a decision message alone is not"


#: The guards a decision meets, in order, and what each leads to (then the parked
#: task's input must be one a decision can resume, or it is invalid).
DECISION_GUARDS: Final[tuple[tuple[str, DecisionGuard, str], ...]] = (
    ("unknown escalation", _unknown, "invalid"),
    ("not decided", _not_decided, "stale"),
)


def _decision(at: _Context, decision: Decision) -> Intake | Needs:
    """A decision resumes the task parked behind its escalation. What was decided,
    and by whom, is what the escalation's record says (its steps are attributed to
    their writers), not what the message's body says."""
    if needs := at.facts.lacking(escalations=(decision.escalation_id,)):
        return needs
    stored = at.facts.escalations[decision.escalation_id]
    for _name, guard, leads_to in DECISION_GUARDS:
        why = guard(decision, stored)
        if why is not None:
            return _refuse(at, "invalid", why) if leads_to == "invalid" else _stale(why)
    assert stored is not None  # the guards above hold
    escalation = stored.record
    task_id = escalation.task_id or ""
    if needs := at.facts.lacking(records=(task_id,)):
        return needs
    record = at.facts.records[task_id]
    decision = decision.model_copy(
        update={
            "decision": escalation.decision or decision.decision,
            "approved": escalation.approved,
            "decided_by": escalation.decided_by or decision.decided_by,
        }
    )
    item = None
    if record.state is not None and record.state.source is not None:
        # The parked item is rebuilt from the message that started it (a task, or a
        # contract to review; its record keeps it), so finishing it has the same effects.
        kept = record.state.source
        source = codec.decode(str(kept["subject"]), codec.encode_map(kept["message"]))
        if isinstance(source, Handoff):
            review = review_item(source)
            item = Item(task=review, kind=review.kind, source=source)
        elif isinstance(source, Task):
            item = Item(task=source, kind="task", source=source)
        else:
            return _refuse(at, "invalid", f"{kept['subject']} cannot be resumed by a decision")
    received = at.received
    given = Decided(
        escalation_id=escalation.id,
        approval=escalation.kind == "approval",
        approved=decision.approved,
        decided_by=decision.decided_by,
        text=decision.decision,
        # The escalation's reason, from its record, goes with the decision: a handler
        # resumed by an approval can tell which approval it was.
        decision={**decision.model_dump(mode="json"), "reason": escalation.reason},
        reason=escalation.reason,
        orphan=orphan_of(at.role, received.subject, received.stream_seq, None),
        now=at.now,
        attempt=received.delivered,
        last_try=received.delivered >= at.role.max_deliver,
        cancelled=at.cancelled.get(task_id),
    )
    return Intake(given, record, item)
