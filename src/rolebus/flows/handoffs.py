"""Contract handoffs between roles: the work item a receiver reviews, its answer
back to the sender, and the offer a handler's ``handoff`` outcome sends (pure: the
registry's writes are preparations, its versions facts)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rolebus.errors import RoleError
from rolebus.flows.contract_document import (
    ContractError,
    ContractVersion,
    check_publication,
    document_from,
    version_of,
)
from rolebus.flows.outbox import Effect, effect
from rolebus.flows.preparations import PublishContract, RecordContractAnswer
from rolebus.team.roles import PERSON, Team
from rolebus.wire.messages import Event, Handoff, HandoffRequest, Task
from rolebus.wire.subjects import event_subject, handoff_subject

__all__ = ["handoff_event", "offer", "review_answer", "review_item"]


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
        created_at=handoff.created_at,
    )


def _known(versions: Sequence[ContractVersion], contract: str, version: str) -> None:
    if version_of(versions, version) is None:
        known = ", ".join(entry.document.version for entry in versions)
        raise ContractError(
            f"no contract {contract!r} version {version}",
            hint=f"versions: {known}" if known else "`rolebus contracts list`",
        )


def review_answer(
    offer: Handoff,
    result: Any,
    *,
    role: str,
    team: Team,
    versions: Sequence[ContractVersion],
    now: datetime,
) -> tuple[RecordContractAnswer, list[Effect]]:
    """The reviewer's answer (``{"answer": "accepted" | "changes-requested",
    "reasons": [...]}``, accepted by default): to record, and to send back."""
    answer = "accepted"
    reasons: list[str] = []
    if isinstance(result, dict):
        answer = str(result.get("answer", "accepted"))
        reasons = [str(reason) for reason in result.get("reasons", [])]
    if answer not in ("accepted", "changes-requested"):
        raise ContractError(
            f"a handoff answer is 'accepted' or 'changes-requested', not {answer!r}"
        )
    _known(versions, offer.contract, offer.version)
    recorded = RecordContractAnswer(
        offer.contract, offer.version, role, accepted=answer == "accepted", reasons=tuple(reasons)
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
        created_at=now,
    )
    effects = [handoff_event(reply, answer, role=role, now=now)]
    if offer.from_role is not None and offer.from_role in team.roles:
        effects.insert(
            0, effect(handoff_subject(offer.from_role, offer.contract, sender=role), reply)
        )
    return recorded, effects


def offer(
    task: Task,
    request: HandoffRequest,
    *,
    number: int,
    role: str,
    team: Team,
    versions: Sequence[ContractVersion],
    now: datetime,
) -> tuple[PublishContract | None, list[Effect]]:
    """The contract version to register (when the handler brings the document and it
    is new) and the messages that offer it to the receiving role."""
    if request.to not in team.roles:
        raise RoleError(
            f"handoff to role {request.to!r}, which does not exist",
            hint=f"known roles: {', '.join(sorted(team.roles))}",
        )
    publish = None
    if request.document is not None:
        document = document_from(request.document, source=f"contract from {role}")
        if (document.name, document.version) != (request.contract, request.version):
            raise ContractError(
                f"handoff names {request.contract} {request.version} but the document is "
                f"{document.name} {document.version}"
            )
        authors = team.contract_authors(document.name)
        if check_publication(document, author=role, versions=versions, authors=authors) is None:
            publish = PublishContract(
                ContractVersion(document=document, author=role, published_at=now)
            )
    else:
        _known(versions, request.contract, request.version)
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
        created_at=now,
    )
    return publish, [
        effect(handoff_subject(request.to, request.contract, sender=role), handoff),
        handoff_event(handoff, "offered", role=role, now=now),
    ]


def handoff_event(handoff: Handoff, state: str, *, role: str, now: datetime) -> Effect:
    event = Event(
        created_at=now,
        at=now,
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
