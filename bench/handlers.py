"""Handlers the benchmark's workers run."""

from __future__ import annotations

from rolebus.handlers.base import HandlerContext
from rolebus.wire.messages import FollowUp, Outcome, Task

_DONE = FollowUp(subject="task.frontend.done", title="done")


async def follow_up(task: Task, context: HandlerContext) -> Outcome:
    """Complete with one follow-up task: what the end-to-end benchmark times."""
    return Outcome(status="completed", tasks=[_DONE])


async def noop(task: Task, context: HandlerContext) -> Outcome:
    return Outcome(status="completed")
