"""What a handler's answer (or a role's boundary) becomes: an input of the task
lifecycle, with the messages it sends prepared.

Preparing needs the bus (an escalation opened in its store, a contract checked in the
registry, a decision recorded) and the team (who an escalation goes to), so it is
done here, before :func:`rolebus.flows.lifecycle.step` decides what the input does
to the task's record. Nothing here writes the task's record or acks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rolebus.errors import RoleError
from rolebus.flows.actions import Message
from rolebus.flows.contracts import ContractError, ContractRegistry
from rolebus.flows.effects import effect, follow_up_tasks
from rolebus.flows.escalation import (
    EscalationStore,
    climb_target,
    decision_effects,
    decision_from_result,
    escalation_event,
    record_for,
    resolve_target,
    timeout_for,
    timer_effects,
)
from rolebus.flows.handoffs import answer_effects, offer_effects
from rolebus.flows.inputs import (
    Breach,
    Completed,
    Escalated,
    Failed,
    HandedOver,
    Input,
    Refused,
)
from rolebus.flows.record import TaskState
from rolebus.handlers.base import BudgetBreachError
from rolebus.team.authority import approver_for, quoted, refusal
from rolebus.team.roles import PERSON, NeverRule, RoleSpec, Team
from rolebus.wire.messages import (
    Envelope,
    Escalation,
    EscalationRequest,
    FollowUp,
    Handoff,
    Outcome,
    Task,
    utc_now,
)
from rolebus.wire.subjects import escalation_subject, task_subject
from rolebus.worker.brakes import BrakeCheck

__all__ = ["Answers", "Item"]


@dataclass(frozen=True)
class Item:
    """A work item (what the handler sees) and the message it came from."""

    task: Task
    kind: str  # task | handoff | escalation
    source: Envelope


class Answers:
    """Turns outcomes and boundaries into lifecycle inputs for one role."""

    def __init__(
        self,
        role: RoleSpec,
        team: Team,
        escalations: EscalationStore,
        contracts: ContractRegistry,
    ) -> None:
        self.brakes = BrakeCheck(role)
        self.role = role
        self.team = team
        self.escalations = escalations
        self.contracts = contracts

    async def of(
        self, item: Item, record: TaskState, outcome: Outcome, *, attempt: int, now: datetime
    ) -> Input:
        """The input a handler's outcome is. An outcome that asks the impossible (an
        unknown role, a contract that breaks its predecessor) is a permanent
        failure with the reason."""
        answered = outcome.model_dump(mode="json", exclude_defaults=True)
        refused = refusal(outcome, self.role)
        if refused is not None:
            why = f"refused: {refused}"
            return self.failed(record, why, answered, attempt=attempt, now=now)
        try:
            return await self._prepare(item, record, outcome, answered, attempt=attempt, now=now)
        except (RoleError, ContractError) as error:
            return self.failed(record, error.message, answered, attempt=attempt, now=now)

    async def breach(
        self,
        item: Item,
        record: TaskState,
        breach: BudgetBreachError,
        *,
        attempt: int,
        now: datetime,
    ) -> Escalated:
        """The budget gate refused a call: park for the approval the bus asked."""
        answered: dict[str, Any] = {"status": "escalate", "escalation": breach.request.model_dump()}
        if breach.usage is not None:
            answered["usage"] = breach.usage.model_dump(mode="json")
        return await self._bus_asks(item, record, breach.request, answered, attempt, now)

    async def _bus_asks(
        self,
        item: Item,
        record: TaskState,
        request: EscalationRequest,
        answered: dict[str, Any],
        attempt: int,
        now: datetime,
    ) -> Escalated:
        """Park for an approval the bus asks (a breach, a brake): nothing of the
        answer that met it is sent."""
        return await self.escalate(
            item,
            record,
            request,
            [],
            record.sent,
            approval=True,
            now=now,
            attempt=attempt,
            outcome=answered,
            made_by_bus=True,
        )

    def failed(
        self,
        record: TaskState,
        error: str,
        answered: dict[str, Any] | None,
        *,
        attempt: int,
        now: datetime,
        retryable: bool = False,
    ) -> Failed:
        return Failed(
            now=now,
            subject=record.subject,
            attempt=attempt,
            outcome=answered,
            error=error,
            retryable=retryable,
            max_deliver=self.role.max_deliver,
            delay=self.role.retry_delay(attempt),
        )

    async def _prepare(
        self,
        item: Item,
        record: TaskState,
        outcome: Outcome,
        answered: dict[str, Any],
        *,
        attempt: int,
        now: datetime,
    ) -> Input:
        task = item.task
        usage = outcome.usage
        outcome = with_routes(self.role, task, outcome)
        flow_brake, shares = self.brakes.flow(
            task,
            record,
            len(outcome.tasks),
            spent_tokens=usage.tokens if usage is not None else 0,
            spent_usd=(usage.cost_usd or 0.0) if usage is not None else 0.0,
        )
        if flow_brake is not None:
            return await self._bus_asks(item, record, flow_brake, answered, attempt, now)
        follow_ups = follow_up_tasks(
            task,
            outcome.tasks,
            role=self.role.id,
            first=record.sent + 1,
            flow_budget=shares.tasks,
            flow_tokens=shares.tokens,
            flow_usd=shares.usd,
        )
        sent = record.sent + len(follow_ups)
        numbered: dict[str, Any] = {
            "now": now,
            "attempt": attempt,
            "outcome": answered,
            "numbered_from": record.sent,
            "subject": record.subject,
        }
        if outcome.status == "completed":
            extra = await self._completion_effects(item, outcome)
            return Completed(
                result=outcome.result, effects=(*follow_ups, *extra), sent=sent, **numbered
            )
        if outcome.status == "handoff":
            if outcome.handoff is None:
                raise ContractError("a handoff outcome needs 'handoff'")
            # Handing a reviewed contract on accepts it: the sender hears so too.
            extra = await self._completion_effects(item, outcome)
            offers = await offer_effects(
                task,
                outcome.handoff,
                number=sent + 1,
                role=self.role.id,
                team=self.team,
                registry=self.contracts,
            )
            return Completed(
                result=outcome.result or {"handed": outcome.handoff.model_dump()},
                effects=(*follow_ups, *extra, *offers),
                sent=sent + 1,
                **numbered,
            )
        if outcome.status == "escalate":
            if outcome.escalation is None:
                raise RoleError("an escalate outcome needs 'escalation'")
            if item.kind == "escalation":
                climbed = await self._climb(item, outcome.escalation, follow_ups)
                return Completed(
                    result={"climbed_to": climbed[0], "why": outcome.escalation.question},
                    effects=climbed[1],
                    sent=sent,
                    **numbered,
                )
            brake = self.brakes.rounds(record, outcome.escalation)
            return await self.escalate(
                item,
                record,
                brake or outcome.escalation,
                follow_ups,
                sent,
                approval=brake is not None or outcome.escalation.approval,
                made_by_bus=brake is not None,
                now=now,
                attempt=attempt,
                outcome=answered,
            )
        return self.failed(
            record,
            outcome.error or "failed",
            answered,
            attempt=attempt,
            now=now,
            retryable=outcome.retryable,
        )

    async def boundary(
        self, item: Item, record: TaskState, rule: NeverRule, *, attempt: int, now: datetime
    ) -> Input:
        """The role must never do this alone: ask, hand over, or refuse."""
        task = item.task
        sent = record.sent
        if rule.action == "approval":
            request = EscalationRequest(
                reason=task.kind,
                to=approver_for(rule, task),
                question=f"{self.role.title} asks approval to {task.kind} the task titled "
                f"{quoted(task.title)} (rule: never {rule.what})",
            )
            return await self.escalate(
                item,
                record,
                request,
                [],
                sent,
                approval=True,
                boundary=rule.what,
                now=now,
                attempt=attempt,
            )
        if rule.action == "handoff" and rule.to is not None:
            target = self.team.role(rule.to)
            if not target.domains:
                raise RoleError(
                    f"role {rule.to} owns no domain to hand {task.kind} to", file=self.role.source
                )
            moved = task.model_copy(
                update={
                    "id": f"{task.id}-{sent + 1}",
                    "from_role": self.role.id,
                    "correlation_id": task.flow_id,
                    "causation_id": task.id,
                }
            )
            subject = task_subject(target.domains[0], task.kind, sender=self.role.id)
            return HandedOver(
                now=now,
                subject=record.subject,
                attempt=attempt,
                numbered_from=sent,
                result={
                    "to": rule.to,
                    "task_id": moved.id,
                    "subject": subject,
                    "because": f"{self.role.id} never {rule.what}",
                },
                effects=(effect(subject, moved),),
                sent=sent + 1,
            )
        why = f"{self.role.id} never {rule.what}"
        return Refused(now=now, attempt=attempt, subject=record.subject, error=why)

    async def escalate(
        self,
        item: Item,
        record: TaskState,
        request: EscalationRequest,
        follow_ups: list[Message],
        sent: int,
        *,
        approval: bool,
        now: datetime,
        attempt: int,
        outcome: dict[str, Any] | None = None,
        boundary: str | None = None,
        made_by_bus: bool = False,
    ) -> Escalated:
        """Open the escalation the task will wait for, and the messages that ask it
        (``made_by_bus``: a breach or a brake, not a handler's question)."""
        task = item.task
        to = resolve_target(self.team, self.role, request.reason, request.to)
        escalation = Escalation(
            id=f"{task.id}-{sent + 1}",
            to_role=to,
            reason=request.reason,
            question=request.question,
            task_id=task.id,
            options=request.options,
            timeout_s=timeout_for(self.role, request.reason),
            from_role=self.role.id,
            correlation_id=task.flow_id,
            causation_id=task.id,
        )
        opened = await self.escalations.open(
            record_for(escalation, kind="approval" if approval else "question")
        )
        effects = [
            *follow_ups,
            effect(
                escalation_subject(to, request.reason, sender=self.role.id),
                escalation,
                msg_id=f"{escalation.id}-l0",
            ),
            *timer_effects(self.team, escalation, opened),
            escalation_event(
                self.role.id, opened, "opened", detail={"boundary": boundary} if boundary else {}
            ),
        ]
        kind = Breach if made_by_bus else Escalated
        return kind(
            now=now,
            subject=record.subject,
            attempt=attempt,
            outcome=outcome,
            numbered_from=record.sent,
            escalation_id=escalation.id,
            to=to,
            reason=request.reason,
            effects=tuple(effects),
            sent=sent + 1,
            source={"subject": record.subject, "message": item.source.model_dump(mode="json")},
        )

    async def _completion_effects(self, item: Item, outcome: Outcome) -> list[Message]:
        """Completing a handoff review answers the sender; completing an escalation
        is the decision (unless someone decided first)."""
        result = outcome.result
        if item.kind == "handoff" and isinstance(item.source, Handoff):
            return await answer_effects(
                item.source, result, role=self.role.id, team=self.team, registry=self.contracts
            )
        if item.kind == "escalation" and isinstance(item.source, Escalation):
            text, approved = decision_from_result(result)
            decided = await self.escalations.decide(
                item.source.id,
                decision=text,
                approved=approved,
                decided_by=self.role.id,
                as_holder=True,
            )
            return decision_effects(decided, self.team) if decided is not None else []
        return []

    async def _climb(
        self, item: Item, request: EscalationRequest, follow_ups: list[Message]
    ) -> tuple[str, tuple[Message, ...]]:
        """The deciding role does not know either: pass it one level up (or to ``to``)."""
        assert isinstance(item.source, Escalation)
        escalation = item.source
        to = request.to or climb_target(self.team, self.role.id)
        if to != PERSON and to not in self.team.roles:
            raise RoleError(f"escalation to role {to!r}, which does not exist")
        found = await self.escalations.require(escalation.id)
        effects = list(follow_ups)
        if found.record.status == "open" and found.record.level == escalation.level:
            higher = escalation.model_copy(update={"to_role": to, "level": escalation.level + 1})
            changed = await self.escalations.change(
                found,
                holder=to,
                level=higher.level,
                trail=[*found.record.trail, to],
                deadline=utc_now() + timedelta(seconds=found.record.timeout_s),
            )
            if changed is not None:
                effects.append(
                    effect(
                        escalation_subject(to, escalation.reason, sender=self.role.id),
                        higher,
                        msg_id=f"{escalation.id}-l{higher.level}",
                    )
                )
                effects += timer_effects(self.team, higher, changed.record)
                effects.append(
                    escalation_event(
                        self.role.id, changed.record, "climbed", detail={"why": request.question}
                    )
                )
        return to, tuple(effects)


def with_routes(role: RoleSpec, task: Task, outcome: Outcome) -> Outcome:
    """``outcome`` with the tasks the role's ``then`` routes file after it (none to a
    subject the handler already asked for)."""
    if outcome.status != "completed" or not role.then:
        return outcome
    asked = {follow_up.subject for follow_up in outcome.tasks}
    routed = [
        FollowUp(
            subject=route.subject,
            title=route.title.replace("{title}", task.title).replace("{kind}", task.kind),
            payload={"after": {"title": task.title, "kind": task.kind, "result": outcome.result}},
        )
        for route in role.then
        if route.applies_to(task.kind) and route.subject not in asked
    ]
    return outcome.model_copy(update={"tasks": [*outcome.tasks, *routed]}) if routed else outcome
