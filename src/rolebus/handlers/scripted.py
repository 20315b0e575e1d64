"""Built-in scripted agents (``handler = "builtin:NAME"``): deterministic, offline.

``scripted`` follows directives in the task's payload, which makes it the handler
of choice for tests, benchmarks and demos:

- ``sleep``: seconds to work before answering;
- ``fail_attempts``: fail (retryable) on the first N attempts, then succeed;
- ``fail``: ``"permanent"`` fails without retry;
- ``then``: follow-up tasks, a list of ``{subject, title, kind?, payload?}``;
- ``result``: what to answer (default: a short summary).

``noop`` completes at once (the benchmark's handler). The team's own scripted
agents (``builtin:eng-be`` and the others) are in :mod:`rolebus.handlers.team`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rolebus.handlers.base import HandlerContext
from rolebus.wire.messages import FollowUp, Outcome, Task

__all__ = ["noop", "scripted"]

_COMPLETED = Outcome(status="completed")


async def noop(task: Task, context: HandlerContext) -> Outcome:
    return _COMPLETED


async def scripted(task: Task, context: HandlerContext) -> Outcome:
    payload: dict[str, Any] = task.payload
    if isinstance(seconds := payload.get("sleep"), int | float) and seconds > 0:
        await asyncio.sleep(float(seconds))
    if payload.get("fail") == "permanent":
        return Outcome.failed(f"{task.kind} cannot be done (scripted)", retryable=False)
    failures = payload.get("fail_attempts", 0)
    if isinstance(failures, int) and context.attempt <= failures:
        return Outcome.failed(
            f"scripted failure on attempt {context.attempt} of {failures}", retryable=True
        )
    follow_ups = [FollowUp.model_validate(item) for item in payload.get("then", [])]
    result = payload.get("result", {"done": task.title, "by": context.role.id})
    return Outcome(status="completed", result=result, tasks=follow_ups)
