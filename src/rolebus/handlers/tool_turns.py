"""An LLM role's tool turns: what the role's card says of each call the model asks
for, and the calls that may run, run once (recorded, see :mod:`rolebus.handlers.recorded`).

A call outside the allow list, or one a ``never`` rule refuses, is answered with the
reason for the model to read. A call with a boundary tag that needs an approval parks
the task with that approval first (the bus opens it: a model cannot). A call that
is not idempotent runs once a task, whatever the deliveries, and never in a rerun.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from rolebus.handlers.base import HandlerContext
from rolebus.handlers.recorded import call_key, read_or_make
from rolebus.handlers.tools import Toolbox, ToolCall, ToolError
from rolebus.team.authority import TOOL_REASON, approver_for
from rolebus.team.roles import PERSON
from rolebus.wire.messages import EscalationRequest, Outcome, Task, Usage

__all__ = ["Attempt", "tool_turn"]


@dataclass
class Attempt:
    """One attempt's running figures."""

    usage: Usage
    toolbox: Toolbox
    number: int = 0  # model calls so far (each is recorded under its number)
    tagged: int = 0  # calls to boundary-tagged tools so far


async def _done(text: str) -> str:
    return text


async def tool_turn(
    asked: list[tuple[str, str, str]],
    text: str,
    task: Task,
    context: HandlerContext,
    attempt: Attempt,
) -> list[dict[str, Any]] | Outcome:
    """The tool messages answering the model's calls (run in parallel), or the
    escalation a boundary asks for first."""
    calls = [ToolCall(*call) for call in asked]
    results: list[str | None] = []
    for call in calls:  # in order: the n-th call with a tag needs n approvals of that tag
        ruled = _ruling(call, task, context, attempt)
        if isinstance(ruled, Outcome):
            return ruled
        results.append(ruled)
    texts = await asyncio.gather(
        *(
            _run(call, task, context, attempt) if ruled is None else _done(ruled)
            for call, ruled in zip(calls, results, strict=True)
        )
    )
    return [
        {
            "role": "assistant",
            "content": text or None,
            "tool_calls": [call.as_message() for call in calls],
        },
        *(
            {"role": "tool", "tool_call_id": call.id, "content": answer}
            for call, answer in zip(calls, texts, strict=True)
        ),
    ]


def _ruling(
    call: ToolCall, task: Task, context: HandlerContext, attempt: Attempt
) -> str | Outcome | None:
    """What the role's card says of this call: None (it runs), a refusal the model
    reads, or an approval to ask for first."""
    role, toolbox = context.role, attempt.toolbox
    if not toolbox.allowed(call.name):
        return (
            f"refused: the tool {call.name!r} is not allowed for role {role.id} "
            f"(its tools: {', '.join(toolbox.names)})"
        )
    tag = toolbox.boundary(call.name)
    if tag is None:
        return None
    rule = next((rule for rule in role.never if tag in rule.kinds), None)
    if rule is not None and rule.action == "refuse":
        return f"refused: {role.id} must never {rule.what} (the tool {call.name!r} is {tag})"
    attempt.tagged += 1
    reason = f"{TOOL_REASON}{tag}"
    approvals = sum(
        1
        for decision in context.decisions
        if decision.approved and (decision.model_extra or {}).get("reason") == reason
    )
    if approvals >= attempt.tagged:
        return None  # approved: it runs (once: its result is recorded)
    approver = (approver_for(rule, task) if rule is not None else None) or role.reports_to
    return Outcome(
        status="escalate",
        escalation=EscalationRequest(
            # Not the boundary's own reason: that approval the bus opens for a task of
            # the kind, and refuses from any handler.
            reason=reason,
            question=(
                f"{role.title} ({role.id}) asks to call the {tag} tool {call.name!r} "
                f"with {call.arguments[:500]}: approve?"
            ),
            to=approver or PERSON,
            approval=True,
        ),
    )


async def _run(call: ToolCall, task: Task, context: HandlerContext, attempt: Attempt) -> str:
    """Run one call, or read its recorded result."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        return "invalid arguments: a JSON object is needed"
    digest = hashlib.sha256(f"{call.name}\n{call.arguments}".encode()).hexdigest()[:32]
    once = not attempt.toolbox.idempotent(call.name)
    rerun = bool(context.extra.get("rerun"))

    def reuse(recorded: dict[str, Any]) -> str | None:
        return str(recorded.get("answer", "")) if recorded.get("tool") == call.name else None

    def unmade() -> str:
        return f"the tool {call.name!r} is not run in a rerun, and no result was recorded"

    async def make() -> tuple[str, dict[str, Any]]:
        await context.progress(f"tool {call.name}", step=attempt.number)
        started = time.monotonic()
        try:
            text, failed = await attempt.toolbox.call(call.name, arguments)
        except ToolError as error:
            text, failed = f"the tool cannot be reached: {error.message}", True
        record = {
            "task_id": task.id,
            "generation": context.generation,
            "number": attempt.number,  # the model call that asked for it
            "tool": call.name,
            "model": f"tool {call.name}",
            "mode": "tool call",
            "messages": [{"role": "arguments", "content": call.arguments}],
            "answer": text,
            "error": failed,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        }
        return text, record

    # An idempotent tool's call is recorded too, to be seen, and never reused.
    return await read_or_make(
        context.calls,
        call_key(task.id, context.generation, f"t{digest}"),
        make=make,
        reuse=reuse if once else None,
        unmade=unmade if once and rerun else None,
    )
