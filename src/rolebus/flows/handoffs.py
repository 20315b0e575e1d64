"""Contract handoffs between roles: the work item a receiver reviews, its answer
back to the sender, and the offer a handler's ``handoff`` outcome sends."""

from __future__ import annotations

from typing import Any

from rolebus.errors import RoleError
from rolebus.flows.contracts import ContractError, ContractRegistry, document_from
from rolebus.flows.effects import Effect, effect
from rolebus.team.roles import PERSON, Team
from rolebus.wire.messages import Event, Handoff, HandoffRequest, Task
from rolebus.wire.subjects import event_subject, handoff_subject

__all__ = ["answer_effects", "handoff_event", "offer_effects", "review_item"]


def review_item(handoff: Handoff) -> Task:
    """What the receiving role's handler sees: a contract to review (``handoff``),
    or the answer to one it sent (``handoff-answer``)."""
    offered = handoff.status == "offered"
    verb = "review" if offered else f"{handoff.status} by {handoff.from_role}:"
    return Task(
        id=handoff.id,
        kind="handoff" if offered else "handoff-answer",
        title=f"{verb} contract {handoff.contract} {handoff.version}",
        payload={
            "contract": handoff.contract,
            "version": handoff.version,
            "status": handoff.status,
            "reasons": handoff.reasons,
            "note": handoff.note,
            "from_role": handoff.from_role,
            "task_id": handoff.task_id,
            "contracts": [f"{handoff.contract}@{handoff.version}"],
        },
        from_role=handoff.from_role,
        correlation_id=handoff.flow_id,
        # The review shares the handoff's id, so its cause is what caused the handoff.
        causation_id=handoff.causation_id,
    )


async def answer_effects(
    offer: Handoff, result: Any, *, role: str, team: Team, registry: ContractRegistry
) -> list[Effect]:
    """Record the reviewer's answer (``{"answer": "accepted" | "changes-requested",
    "reasons": [...]}``, accepted by default) and send it back to the sender."""
    answer = "accepted"
    reasons: list[str] = []
    if isinstance(result, dict):
        answer = str(result.get("answer", "accepted"))
        reasons = [str(reason) for reason in result.get("reasons", [])]
    if answer not in ("accepted", "changes-requested"):
        raise ContractError(
            f"a handoff answer is 'accepted' or 'changes-requested', not {answer!r}"
        )
    await registry.record_answer(
        offer.contract, offer.version, role=role, accepted=answer == "accepted", reasons=reasons
    )
    reply = Handoff(
        id=f"{offer.id}-answer",
        to_role=offer.from_role or PERSON,
        contract=offer.contract,
        version=offer.version,
        status=answer,  # type: ignore[arg-type]
        reasons=reasons,
        task_id=offer.task_id,
        from_role=role,
        correlation_id=offer.flow_id,
        causation_id=offer.id,
    )
    effects = [handoff_event(reply, answer, role=role)]
    if offer.from_role is not None and offer.from_role in team.roles:
        effects.insert(
            0, effect(handoff_subject(offer.from_role, offer.contract, sender=role), reply)
        )
    return effects


async def offer_effects(
    task: Task,
    request: HandoffRequest,
    *,
    number: int,
    role: str,
    team: Team,
    registry: ContractRegistry,
) -> list[Effect]:
    """Register the contract version (when the handler brings the document) and
    offer it to the receiving role."""
    if request.to not in team.roles:
        raise RoleError(
            f"handoff to role {request.to!r}, which does not exist",
            hint=f"known roles: {', '.join(sorted(team.roles))}",
        )
    if request.document is not None:
        document = document_from(request.document, source=f"contract from {role}")
        if (document.name, document.version) != (request.contract, request.version):
            raise ContractError(
                f"handoff names {request.contract} {request.version} but the document is "
                f"{document.name} {document.version}"
            )
        await registry.publish(document, author=role)
    else:
        await registry.get(request.contract, request.version)
    handoff = Handoff(
        id=f"{task.id}-{number}",
        to_role=request.to,
        contract=request.contract,
        version=request.version,
        note=request.note,
        task_id=task.id,
        from_role=role,
        correlation_id=task.flow_id,
        causation_id=task.id,
    )
    return [
        effect(handoff_subject(request.to, request.contract, sender=role), handoff),
        handoff_event(handoff, "offered", role=role),
    ]


def handoff_event(handoff: Handoff, state: str, *, role: str) -> Effect:
    event = Event(
        id=f"{handoff.id}_{state}",
        entity="handoff",
        state=state,
        task_id=handoff.task_id or handoff.id,
        role=role,
        correlation_id=handoff.correlation_id,
        causation_id=handoff.id,
        detail={
            "contract": handoff.contract,
            "version": handoff.version,
            "to": handoff.to_role,
            "from": handoff.from_role,
            "reasons": handoff.reasons,
        },
    )
    return effect(event_subject("handoff", state, writer=role), event)
