"""A record's outbox: the messages a transition sends, built as plain maps (pure).

An entry is ``{"subject", "msg_id", "message", "headers"?}``, stored in the task's
record, so that a redelivery after a crash publishes exactly the same messages again
(JetStream drops the duplicates by Msg-Id) instead of asking the handler a second
time (:mod:`rolebus.flows.effects` publishes them).

Numbering: the n-th message a task sends over its whole life has the id
``<task id>-<n>`` (the record counts them across resumed runs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from rolebus.errors import RoleError
from rolebus.wire.messages import FollowUp, Task
from rolebus.wire.subjects import parse_subject, with_sender

__all__ = ["Effect", "effect", "follow_up_tasks"]

Effect = dict[str, Any]


def effect(
    subject: str,
    message: BaseModel,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Effect:
    body = message.model_dump(mode="json")
    entry: Effect = {"subject": subject, "msg_id": msg_id or str(body["id"]), "message": body}
    if headers:
        entry["headers"] = headers
    return entry


def follow_up_tasks(
    task: Task,
    follow_ups: list[FollowUp],
    *,
    role: str,
    first: int,
    now: datetime,
    flow_budget: int | None = None,
    flow_tokens: int | None = None,
    flow_usd: float | None = None,
) -> list[Effect]:
    """Follow-up tasks, numbered from ``first``, in the cause's flow, each with its
    share of what its cause may still cause (``flow_budget``) and spend (``flow_tokens``)."""
    effects = []
    for number, follow_up in enumerate(follow_ups, start=first):
        parsed = parse_subject(follow_up.subject)
        if follow_up.kind is not None and follow_up.kind != parsed.third:
            raise RoleError(
                f"follow-up {follow_up.title!r}: kind {follow_up.kind!r} disagrees with its "
                f"subject {follow_up.subject!r}",
                hint="leave kind out (the subject's third token is the kind), or make them agree",
            )
        if parsed.sender not in (None, role):
            raise RoleError(
                f"follow-up {follow_up.title!r}: its subject {follow_up.subject!r} names the "
                f"sender {parsed.sender!r}, but {role} sends it",
                hint="give task.<domain>.<kind>: the bus adds the sending role",
            )
        child = Task(
            id=f"{task.id}-{number}",
            kind=parsed.third,
            title=follow_up.title,
            payload=follow_up.payload,
            from_role=role,
            correlation_id=task.flow_id,
            causation_id=task.id,
            flow_budget=flow_budget,
            flow_tokens=flow_tokens,
            flow_usd=flow_usd,
            created_at=now,
        )
        effects.append(effect(with_sender(parsed.subject, role), child))
    return effects
