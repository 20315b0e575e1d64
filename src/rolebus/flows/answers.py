"""What a handler's answer (or a role's boundary) becomes: an input of the task
lifecycle, with the messages it sends and the writes it needs first (pure).

:func:`answer` takes what an attempt answered, the task's record and the facts read
for it, and returns a :class:`~rolebus.flows.preparations.Prepared`: the input to
step, after the escalations to open, climb or decide and the contract versions or
answers to record. It asks for the facts it lacks (:class:`~rolebus.flows.facts.Needs`).
An outcome that asks the impossible (an unknown role, a contract that breaks its
predecessor, what only the bus may open) is a permanent failure with the reason; the
role's brakes and ``then`` routes apply here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rolebus.errors import RoleError
from rolebus.flows.answered import BreachAsked, CancelRequested
from rolebus.flows.brakes import BrakeCheck
from rolebus.flows.contract_document import ContractError
from rolebus.flows.escalation_record import climb_target
from rolebus.flows.escalation_rules import (
    decision_effects,
    decision_from_result,
    escalation_event,
    pass_on,
    record_for,
    resolve_target,
    timeout_for,
    timer_effects,
)
from rolebus.flows.facts import Facts, Needs
from rolebus.flows.handoffs import offer, review_answer
from rolebus.flows.inputs import (
    Breach,
    Cancelled,
    Completed,
    Escalated,
    Failed,
    HandedOver,
    Input,
    Refused,
)
from rolebus.flows.intake import Item
from rolebus.flows.outbox import Effect, effect, follow_up_tasks
from rolebus.flows.preparations import (
    ClimbEscalation,
    DecideEscalation,
    OpenEscalation,
    Preparation,
    Prepared,
)
from rolebus.flows.record import TaskState
from rolebus.flows.routes import with_routes
from rolebus.team.authority import approver_for, quoted, refusal
from rolebus.team.roles import PERSON, NeverRule, RoleSpec, Team
from rolebus.wire.messages import Escalation, EscalationRequest, Handoff, Outcome
from rolebus.wire.subjects import escalation_subject, task_subject

__all__ = ["Answered", "answer", "boundary"]

#: What an attempt answered: the handler's outcome, the budget gate's breach, or a
#: cancel that stopped it.
Answered = Outcome | BreachAsked | CancelRequested


@dataclass(frozen=True)
class _At:
    """One answer's givens."""

    item: Item
    record: TaskState
    facts: Facts
    role: RoleSpec
    team: Team
    attempt: int
    now: datetime

    def failed(
        self, error: str, answered: dict[str, Any] | None, *, retryable: bool = False
    ) -> Prepared:
        return Prepared(
            Failed(
                now=self.now,
                subject=self.record.subject,
                attempt=self.attempt,
                outcome=answered,
                error=error,
                retryable=retryable,
                max_deliver=self.role.max_deliver,
                delay=self.role.retry_delay(self.attempt),
            )
        )


def answer(
    answered: Answered,
    item: Item,
    record: TaskState,
    facts: Facts,
    *,
    role: RoleSpec,
    team: Team,
    attempt: int,
    now: datetime,
) -> Prepared | Needs:
    """The input an attempt's answer is (see the module's documentation)."""
    at = _At(item, record, facts, role, team, attempt, now)
    if isinstance(answered, CancelRequested):
        given = Cancelled(now=now, attempt=attempt, subject=record.subject, error=answered.why)
        return Prepared(given)
    if isinstance(answered, BreachAsked):
        dumped_breach: dict[str, Any] = {
            "status": "escalate",
            "escalation": answered.request.model_dump(),
        }
        if answered.usage is not None:
            dumped_breach["usage"] = answered.usage.model_dump(mode="json")
        return _bus_asks(at, answered.request, dumped_breach)
    dumped = answered.model_dump(mode="json", exclude_defaults=True)
    refused = refusal(answered, role)
    if refused is not None:
        return at.failed(f"refused: {refused}", dumped)
    try:
        return _prepare(at, answered, dumped)
    except (RoleError, ContractError) as error:
        return at.failed(error.message, dumped)


def boundary(
    item: Item,
    record: TaskState,
    rule: NeverRule,
    facts: Facts,
    *,
    role: RoleSpec,
    team: Team,
    now: datetime,
) -> Prepared | Needs:
    """The role must never do this alone: ask, hand over, or refuse."""
    at = _At(item, record, facts, role, team, record.attempt, now)
    task, sent = item.task, record.sent
    if rule.action == "approval":
        request = EscalationRequest(
            reason=task.kind,
            to=approver_for(rule, task),
            question=f"{role.title} asks approval to {task.kind} the task titled "
            f"{quoted(task.title)} (rule: never {rule.what})",
        )
        return _escalate(at, request, [], sent, approval=True, boundary=rule.what)
    if rule.action == "handoff" and rule.to is not None:
        target = team.role(rule.to)
        if not target.domains:
            return at.failed(
                f"{role.source}: role {rule.to} owns no domain to hand {task.kind} to", None
            )
        moved = task.model_copy(
            update={
                "id": f"{task.id}-{sent + 1}",
                "from_role": role.id,
                "correlation_id": task.flow_id,
                "causation_id": task.id,
            }
        )
        subject = task_subject(target.domains[0], task.kind, sender=role.id)
        given: Input = HandedOver(
            now=now,
            subject=record.subject,
            attempt=record.attempt,
            numbered_from=sent,
            result={
                "to": rule.to,
                "task_id": moved.id,
                "subject": subject,
                "because": f"{role.id} never {rule.what}",
            },
            effects=(effect(subject, moved),),
            sent=sent + 1,
        )
        return Prepared(given)
    why = f"{role.id} never {rule.what}"
    return Prepared(Refused(now=now, attempt=record.attempt, subject=record.subject, error=why))


def _bus_asks(
    at: _At, request: EscalationRequest, answered: dict[str, Any] | None
) -> Prepared | Needs:
    """Park for an approval the bus asks (a breach, a brake): nothing of the answer
    that met it is sent."""
    return _escalate(at, request, [], at.record.sent, approval=True, outcome=answered, by_bus=True)


def _prepare(at: _At, outcome: Outcome, answered: dict[str, Any]) -> Prepared | Needs:
    task, record, role = at.item.task, at.record, at.role
    usage = outcome.usage
    outcome = with_routes(role, task, outcome)
    brakes = BrakeCheck(role)
    flow_brake, shares = brakes.flow(
        task,
        record,
        len(outcome.tasks),
        spent_tokens=usage.tokens if usage is not None else 0,
        spent_usd=(usage.cost_usd or 0.0) if usage is not None else 0.0,
    )
    if flow_brake is not None:
        return _bus_asks(at, flow_brake, answered)
    follow_ups = follow_up_tasks(
        task,
        outcome.tasks,
        role=role.id,
        first=record.sent + 1,
        now=at.now,
        flow_budget=shares.tasks,
        flow_tokens=shares.tokens,
        flow_usd=shares.usd,
    )
    sent = record.sent + len(follow_ups)
    numbered: dict[str, Any] = {
        "now": at.now,
        "attempt": at.attempt,
        "outcome": answered,
        "numbered_from": record.sent,
        "subject": record.subject,
    }
    if outcome.status == "completed":
        done = _completion(at, outcome)
        if isinstance(done, Needs):
            return done
        extra, preparations = done
        given = Completed(
            result=outcome.result, effects=(*follow_ups, *extra), sent=sent, **numbered
        )
        return Prepared(given, preparations)
    if outcome.status == "handoff":
        request = outcome.handoff
        if request is None:
            raise ContractError("a handoff outcome needs 'handoff'")
        # Handing a reviewed contract on accepts it: the sender hears so too.
        done = _completion(at, outcome)
        if isinstance(done, Needs):
            return done
        if needs := at.facts.lacking(contracts=(request.contract,)):
            return needs
        extra, preparations = done
        publish, offers = offer(
            task,
            request,
            number=sent + 1,
            role=role.id,
            team=at.team,
            versions=at.facts.contracts[request.contract],
            now=at.now,
        )
        given = Completed(
            result=outcome.result or {"handed": request.model_dump()},
            effects=(*follow_ups, *extra, *offers),
            sent=sent + 1,
            **numbered,
        )
        return Prepared(given, (*preparations, *((publish,) if publish else ())))
    if outcome.status == "escalate":
        if outcome.escalation is None:
            raise RoleError("an escalate outcome needs 'escalation'")
        if at.item.kind == "escalation":
            return _climb(at, outcome.escalation, follow_ups, sent, numbered)
        brake = brakes.rounds(record, outcome.escalation)
        return _escalate(
            at,
            brake or outcome.escalation,
            follow_ups,
            sent,
            approval=brake is not None or outcome.escalation.approval,
            by_bus=brake is not None,
            outcome=answered,
        )
    return at.failed(outcome.error or "failed", answered, retryable=outcome.retryable)


def _escalate(
    at: _At,
    request: EscalationRequest,
    follow_ups: list[Effect],
    sent: int,
    *,
    approval: bool,
    outcome: dict[str, Any] | None = None,
    boundary: str | None = None,
    by_bus: bool = False,
) -> Prepared | Needs:
    """The escalation the task will wait for (opened, or as an earlier attempt opened
    it), and the messages that ask it (``by_bus``: a breach or a brake, not a
    handler's question)."""
    task, role, now = at.item.task, at.role, at.now
    to = resolve_target(at.team, role, request.reason, request.to)
    escalation = Escalation(
        id=f"{task.id}-{sent + 1}",
        to_role=to,
        reason=request.reason,
        question=request.question,
        task_id=task.id,
        options=request.options,
        timeout_s=timeout_for(role, request.reason),
        from_role=role.id,
        correlation_id=task.flow_id,
        causation_id=task.id,
        created_at=now,
    )
    if needs := at.facts.lacking(escalations=(escalation.id,)):
        return needs
    existing = at.facts.escalations[escalation.id]
    preparations: tuple[Preparation, ...] = ()
    if existing is None:
        opened = record_for(
            escalation, kind="approval" if approval else "question", now=now, team=at.team
        )
        preparations = (OpenEscalation(opened),)
    else:
        opened = existing.record
    effects = [
        *follow_ups,
        effect(
            escalation_subject(to, request.reason, sender=role.id),
            escalation,
            msg_id=f"{escalation.id}-l0",
        ),
        *timer_effects(at.team, escalation, opened),
        escalation_event(
            role.id,
            opened,
            "opened",
            now=now,
            detail={"boundary": boundary} if boundary else {},
        ),
    ]
    kind = Breach if by_bus else Escalated
    given = kind(
        now=now,
        subject=at.record.subject,
        attempt=at.attempt,
        outcome=outcome,
        numbered_from=at.record.sent,
        escalation_id=escalation.id,
        to=to,
        reason=request.reason,
        effects=tuple(effects),
        sent=sent + 1,
        source={
            "subject": at.record.subject,
            "message": at.item.source.model_dump(mode="json"),
        },
    )
    return Prepared(given, preparations)


def _completion(at: _At, outcome: Outcome) -> tuple[list[Effect], tuple[Preparation, ...]] | Needs:
    """Completing a handoff review answers the sender; completing an escalation is
    the decision (unless someone decided first, or it moved on)."""
    item, result = at.item, outcome.result
    if item.kind == "handoff" and isinstance(item.source, Handoff):
        offered = item.source
        if needs := at.facts.lacking(contracts=(offered.contract,)):
            return needs
        recorded, effects = review_answer(
            offered,
            result,
            role=at.role.id,
            team=at.team,
            versions=at.facts.contracts[offered.contract],
            now=at.now,
        )
        return effects, (recorded,)
    if item.kind == "escalation" and isinstance(item.source, Escalation):
        if needs := at.facts.lacking(escalations=(item.source.id,)):
            return needs
        stored = at.facts.escalations[item.source.id]
        if stored is None or stored.record.status != "open" or stored.record.holder != at.role.id:
            return [], ()
        text, approved = decision_from_result(result)
        decided = stored.record.model_copy(
            update={
                "status": "decided",
                "decision": text,
                "approved": approved,
                "decided_by": at.role.id,
                "decided_at": at.now,
            }
        )
        effects = decision_effects(decided, at.team, now=at.now)
        return effects, (DecideEscalation(stored, decided),)
    return [], ()


def _climb(
    at: _At,
    request: EscalationRequest,
    follow_ups: list[Effect],
    sent: int,
    numbered: dict[str, Any],
) -> Prepared | Needs:
    """The deciding role does not know either: pass it one level up (or to ``to``)."""
    escalation = at.item.source
    if not isinstance(escalation, Escalation):
        raise RoleError(f"{at.item.task.id} is not an escalation to pass on")
    to = request.to or climb_target(at.team, at.role.id)
    if to != PERSON and to not in at.team.roles:
        raise RoleError(f"escalation to role {to!r}, which does not exist")
    if needs := at.facts.lacking(escalations=(escalation.id,)):
        return needs
    stored = at.facts.escalations[escalation.id]
    climb = pass_on(
        stored,
        escalation,
        to=to,
        why=request.question,
        writer=at.role.id,
        team=at.team,
        now=at.now,
    )
    effects = list(follow_ups)
    preparations: tuple[Preparation, ...] = ()
    if climb is not None and stored is not None and climb.proposed is not None:
        effects += climb.effects
        preparations = (ClimbEscalation(stored, climb.proposed),)
    given = Completed(
        result={"climbed_to": to, "why": request.question},
        effects=tuple(effects),
        sent=sent,
        **numbered,
    )
    return Prepared(given, preparations)
