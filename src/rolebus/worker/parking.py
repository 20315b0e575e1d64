"""Outcomes that wait for someone: a task parks (``input-required``) behind an
escalation, an escalation climbs one level, a decision is recorded; and a role's
boundaries (``never`` rules) ask for approval, hand the task over, or refuse it.

Held by the :class:`~rolebus.worker.dispatch.Dispatcher`; what resumes a parked
task (a decision arriving) is one of the dispatcher's inputs.
"""

from __future__ import annotations

from datetime import timedelta

from rolebus.errors import RoleError
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.effects import Effect, effect
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
from rolebus.flows.handoffs import answer_effects
from rolebus.flows.state import PARKED, StoredState
from rolebus.nats.delivery import InboundMessage
from rolebus.team.roles import PERSON, NeverRule, Team
from rolebus.wire.messages import Escalation, EscalationRequest, Handoff, Outcome, utc_now
from rolebus.wire.subjects import escalation_subject, task_subject
from rolebus.worker.settle import Item, Settling

__all__ = ["Parking"]


class Parking:
    """Escalating, climbing, deciding and the role's boundaries."""

    def __init__(
        self,
        settle: Settling,
        team: Team,
        escalations: EscalationStore,
        contracts: ContractRegistry,
    ) -> None:
        self.settle = settle
        self.role = settle.role
        self.stats = settle.stats
        self._log = settle.log
        self.team = team
        self.escalations = escalations
        self.contracts = contracts

    async def completion_effects(self, item: Item, outcome: Outcome) -> list[Effect]:
        """Completing a handoff review answers the sender; completing an escalation
        is the decision."""
        result = outcome.result
        if item.kind == "handoff" and isinstance(item.source, Handoff):
            return await answer_effects(
                item.source, result, role=self.role.id, team=self.team, registry=self.contracts
            )
        if item.kind == "escalation" and isinstance(item.source, Escalation):
            decision_text, approved = decision_from_result(result)
            return await self.decide(item.source, decision_text, approved, decided_by=self.role.id)
        return []

    async def decide(
        self, escalation: Escalation, text: str, approved: bool | None, *, decided_by: str
    ) -> list[Effect]:
        decided = await self.escalations.decide(
            escalation.id, decision=text, approved=approved, decided_by=decided_by, as_holder=True
        )
        if decided is not None:
            return decision_effects(decided, self.team)
        return []  # someone (a person, a higher role) decided first

    async def park(
        self,
        message: InboundMessage,
        item: Item,
        stored: StoredState,
        request: EscalationRequest,
        follow_ups: list[Effect],
        sent: int,
        *,
        approval: bool,
        boundary: str | None = None,
    ) -> None:
        """Escalate: the task waits (``input-required``) for the decision."""
        task = item.task
        to = resolve_target(self.team, self.role, request.reason, request.to)
        timeout = timeout_for(self.role, request.reason)
        escalation = Escalation(
            id=f"{task.id}-{sent + 1}",
            to_role=to,
            reason=request.reason,
            question=request.question,
            task_id=task.id,
            options=request.options,
            timeout_s=timeout,
            from_role=self.role.id,
            correlation_id=task.flow_id,
            causation_id=task.id,
        )
        record = await self.escalations.open(
            record_for(escalation, kind="approval" if approval else "question")
        )
        effects = [
            *follow_ups,
            effect(
                escalation_subject(to, request.reason, sender=self.role.id),
                escalation,
                msg_id=f"{escalation.id}-l0",
            ),
            *timer_effects(self.team, escalation, record),
            escalation_event(
                self.role.id, record, "opened", detail={"boundary": boundary} if boundary else {}
            ),
        ]
        detail = {
            **stored.state.detail,
            "waiting_for": escalation.id,
            "sent": sent + 1,
            "escalated_to": to,
            "reason": request.reason,
        }
        parked = await self.settle.change(
            stored,
            state=PARKED,
            effects=effects,
            detail=detail,
            attempt=message.delivered,
            error=None,
            source={
                "subject": stored.state.subject,
                "message": item.source.model_dump(mode="json"),
            },
        )
        if parked is None:
            await message.ack()
            return
        await self.settle.publish_resting(message, parked)
        await message.ack()
        self.stats.parked += 1
        self._log.info(
            "task escalated",
            task_id=task.id,
            to=to,
            reason=request.reason,
            escalation_id=escalation.id,
        )

    async def climb(
        self,
        message: InboundMessage,
        item: Item,
        stored: StoredState,
        request: EscalationRequest,
        follow_ups: list[Effect],
        sent: int,
    ) -> None:
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
        await self.settle.finish(
            message,
            item,
            stored,
            state="completed",
            result={"climbed_to": to, "why": request.question},
            effects=effects,
            sent=sent,
        )

    async def apply_boundary(
        self, message: InboundMessage, item: Item, stored: StoredState, rule: NeverRule
    ) -> None:
        """The role must never do this alone: ask, hand over, or refuse."""
        task = item.task
        sent = stored.state.sent
        if rule.action == "approval":
            request = EscalationRequest(
                reason=task.kind,
                to=rule.to,
                question=f"{self.role.title} asks approval to {task.kind}: {task.title} "
                f"(rule: never {rule.what})",
            )
            await self.park(
                message, item, stored, request, [], sent, approval=True, boundary=rule.what
            )
            return
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
            await self.settle.finish(
                message,
                item,
                stored,
                state="handed-off",
                result={
                    "to": rule.to,
                    "task_id": moved.id,
                    "subject": subject,
                    "because": f"{self.role.id} never {rule.what}",
                },
                effects=[effect(subject, moved)],
                sent=sent + 1,
            )
            return
        await self.settle.finish(
            message, item, stored, state="rejected", error=f"{self.role.id} never {rule.what}"
        )
