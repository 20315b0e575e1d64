"""Effects: the messages an outcome sends, recorded before they are published.

An effect is a plain map stored in the task's state record —
``{"subject", "msg_id", "message", "headers"?}`` — so that a redelivery after a
crash publishes exactly the same messages again (JetStream drops the duplicates
by Msg-Id) instead of asking the handler a second time.

Numbering: the n-th message a task sends over its whole life has the id
``<task id>-<n>`` (the state record counts them across resumed runs).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from rolebus.errors import RoleError
from rolebus.nats.connection import Connection
from rolebus.nats.publish import PendingPublish, wait_all
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import Event, FollowUp, Task
from rolebus.wire.subjects import event_subject, parse_subject, with_sender
from rolebus.wire.trace import child_traceparent

__all__ = [
    "effect",
    "follow_up_tasks",
    "publish_effects",
    "publish_event",
]

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
        )
        effects.append(effect(with_sender(parsed.subject, role), child))
    return effects


async def publish_effects(
    connection: Connection, effects: list[Effect], *, trace: str | None, batch: bool = False
) -> None:
    """Publish every effect, pipelined, and wait for all acks (retrying alone).
    ``batch``: through the streams' group commit, sharing fsyncs with whatever else
    is published in the same event-loop turn (for a worker with a backlog)."""
    child_trace = child_traceparent(trace)
    pending: list[PendingPublish] = []
    for entry in effects:
        headers = {Header.TRACEPARENT: child_trace, **entry.get("headers", {})}
        subject, data = entry["subject"], codec.encode_map(entry["message"])
        if batch:
            publish = connection.publish_batched(
                subject, data, msg_id=entry["msg_id"], headers=headers
            )
        else:
            publish = await connection.publish_start(
                subject, data, msg_id=entry["msg_id"], headers=headers
            )
        pending.append(publish)
    await wait_all(pending)


async def publish_event(
    connection: Connection, event: Event, *, trace: str | None, subject: str | None = None
) -> PendingPublish:
    """Start publishing one event (on ``subject``, or its entity's and state's);
    await ``.result()`` before acking what caused it."""
    headers = {Header.TRACEPARENT: trace} if trace else None
    return await connection.publish_start(
        subject or event_subject(event.entity, event.state),
        codec.encode(event),
        msg_id=event.id,
        headers=headers,
    )
