"""One flow as a picture's data: which roles took part, each message of the flow on
the lane of the role it went to, what caused what, and where the work waited.

Read from the history alone (the work stream's messages and the task events of one
correlation), so it draws the same for a flow that ended an hour ago as for one
still running. Drawing it is :mod:`rolebus.web.flowsvg`; this module only decides
what is on the picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from rolebus.flows.calls import CallStore, call_summary
from rolebus.flows.record import TERMINAL_STATES, State
from rolebus.history.replay import ReplayFilter, replay
from rolebus.nats.connection import Connection
from rolebus.team.roles import Team
from rolebus.wire.messages import Decision, Envelope, Escalation, Event, Handoff, Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM, sender_of

__all__ = ["Box", "Flow", "Span", "read_flow"]

#: How a work item's attempt ends; its span on the picture ends there.
_ENDS = TERMINAL_STATES
_WAIT = "waiting for a decision"


@dataclass(frozen=True)
class Box:
    """One message of the flow (or a retry, or a dead letter) on its role's lane."""

    id: str
    kind: str  # task, follow-up, handoff, escalation, decision, retry, dead-letter
    lane: str
    at: datetime
    label: str
    #: The box this one came from (an arrow is drawn from it), when it is on the picture.
    cause: str | None = None
    #: Lines shown when the box is clicked (or hovered, in a standalone SVG).
    details: tuple[str, ...] = ()
    #: The task page to open, when the box is a work item with a record.
    task_id: str | None = None


@dataclass(frozen=True)
class Span:
    """A stretch of time on a lane: a work item being handled, or waiting."""

    lane: str
    start: datetime
    end: datetime
    kind: str  # working, waiting (parked on an escalation), queued (in a backlog)
    box: str  # the box it belongs to
    label: str = ""


@dataclass
class Flow:
    correlation: str
    lanes: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    @property
    def start(self) -> datetime | None:
        return min((box.at for box in self.boxes), default=None)

    @property
    def end(self) -> datetime | None:
        times = [box.at for box in self.boxes] + [span.end for span in self.spans]
        return max(times, default=None)


def addressee(subject: str, team: Team) -> str:
    """The role a work-stream message goes to: a task's domain owner, else the
    role named by the subject's second token (handoff.<role>..., decision.<role>...)."""
    tokens = subject.split(".")
    if tokens[0] == "task" and len(tokens) > 1:
        return team.domain_owner.get(tokens[1], tokens[1])
    return tokens[1] if len(tokens) > 1 else subject


def _box_for(message: Envelope, subject: str, at: datetime, team: Team) -> Box:
    lane = addressee(subject, team)
    # Who sent it is its subject's sender token, which only that role may publish on.
    sent_by = sender_of(subject)
    sender = f"from {sent_by}" if sent_by else "published from outside"
    lines = [f"{subject}", f"id {message.id}", sender, f"at {at.isoformat()}"]
    if isinstance(message, Task):
        kind = "follow-up" if message.causation_id else "task"
        label = message.title
        lines.insert(0, message.title)
    elif isinstance(message, Handoff):
        kind = "handoff"
        label = f"{message.contract} {message.version} {message.status}"
        lines.insert(0, label)
        lines.extend(f"reason: {reason}" for reason in message.reasons)
    elif isinstance(message, Escalation):
        kind = "escalation"
        label = message.question
        lines.insert(0, f"{message.reason}: {message.question}")
        lines.extend(f"option {o.name}: {o.tradeoffs}" for o in message.options)
    elif isinstance(message, Decision):
        kind = "decision"
        verdict = (
            "" if message.approved is None else "approved: " if message.approved else "rejected: "
        )
        label = f"{verdict}{message.decision}"
        lines.insert(0, label)
        lines.append(f"decided by {message.decided_by}")
    else:
        kind, label = "message", subject
    work_item = isinstance(message, Task | Handoff)
    return Box(
        id=message.id,
        kind=kind,
        lane=lane,
        at=at,
        label=label,
        cause=message.causation_id,
        details=tuple(lines),
        task_id=message.id if work_item else None,
    )


async def read_flow(connection: Connection, team: Team, correlation: str) -> Flow:
    """The picture's data for one flow (the root task's id, or any id in the flow)."""
    flow = Flow(correlation)
    async for item in replay(connection, ReplayFilter(stream=WORK_STREAM, correlation=correlation)):
        if item.message is not None:
            flow.boxes.append(_box_for(item.message, item.stored.subject, item.stored.time, team))
    events = [
        item.message
        async for item in replay(
            connection, ReplayFilter(stream=EVENTS_STREAM, correlation=correlation)
        )
        if isinstance(item.message, Event)
    ]
    flow.boxes = [await _with_tool_calls(connection, box) for box in flow.boxes]
    by_id = {box.id: box for box in flow.boxes}
    for event in events:
        if event.entity != "task" or event.state not in (State.RETRYING, State.DEAD):
            continue
        kind = "retry" if event.state == State.RETRYING else "dead-letter"
        flow.boxes.append(
            Box(
                id=event.id,
                kind=kind,
                lane=event.role or (by_id[event.task_id].lane if event.task_id in by_id else "?"),
                at=event.at,
                label=event.error or event.state,
                cause=event.task_id if event.task_id in by_id else None,
                details=(
                    f"{event.state}, attempt {event.attempt}",
                    *([event.error] if event.error else []),
                    f"task {event.task_id}",
                    f"at {event.at.isoformat()}",
                ),
                task_id=event.task_id,
            )
        )
    flow.spans = _spans(by_id, events)
    flow.boxes.sort(key=lambda box: box.at)
    # Lanes in the order the roles joined the flow: it reads from the top down.
    flow.lanes = list(dict.fromkeys(box.lane for box in flow.boxes))
    return flow


async def _with_tool_calls(connection: Connection, box: Box) -> Box:
    """A work item's box with the tool calls its handler made, each a line of its
    details (name, arguments, time, result)."""
    if box.task_id is None:
        return box
    lines = []
    for call in await CallStore(connection).for_task(box.task_id):
        line = call_summary(call)
        if line["tool"] is not None:
            outcome = "failed" if line["error"] else line["result"]
            lines.append(
                f"tool {line['tool']}({line['arguments']}) {line['latency_ms']} ms -> {outcome}"
            )
    return replace(box, details=(*box.details, *lines)) if lines else box


def _spans(boxes: dict[str, Box], events: list[Event]) -> list[Span]:
    """Each work item's time: queued in the backlog until its handler started (the
    events say when), handled until the attempt ended, waiting for a decision while
    parked, waiting again before a retry."""
    by_task: dict[str, list[Event]] = {}
    for event in events:
        if event.entity == "task":
            by_task.setdefault(event.task_id, []).append(event)
    spans: list[Span] = []
    for task_id, history in by_task.items():
        box = boxes.get(task_id)
        if box is not None and box.task_id is not None:
            spans.extend(_task_spans(box, sorted(history, key=lambda e: e.at)))
    return spans


def _task_spans(box: Box, history: list[Event]) -> list[Span]:
    spans: list[Span] = []
    start, queued_label = box.at, "in the backlog"
    waiting_since: datetime | None = None

    def handled(until: datetime, event: Event) -> None:
        nonlocal start
        began = _started(event)
        if queued_label and began is not None and start < began < until:
            spans.append(Span(box.lane, start, began, "queued", box.id, queued_label))
            start = began
        if until > start:
            spans.append(Span(box.lane, start, until, "working", box.id))

    for event in history:
        if event.state == State.CLAIMED and event.at > start:
            spans.append(Span(box.lane, start, event.at, "queued", box.id, queued_label))
            start, queued_label = event.at, ""
        elif event.state == State.RETRYING:
            handled(event.at, event)
            start, queued_label = event.at, "waiting to retry"
        elif event.state == State.PARKED:
            handled(event.at, event)
            waiting_since = event.at
        elif event.state == State.RESUMED and waiting_since is not None:
            spans.append(Span(box.lane, waiting_since, event.at, "waiting", box.id, _WAIT))
            waiting_since, start, queued_label = None, event.at, ""
        elif event.state in _ENDS:
            handled(event.at, event)
            return spans
    if waiting_since is not None:
        end = max(waiting_since, *(e.at for e in history))
        spans.append(Span(box.lane, waiting_since, end, "waiting", box.id, _WAIT))
    return spans


def _started(event: Event) -> datetime | None:
    value = event.detail.get("started_at")
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
