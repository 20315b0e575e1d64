"""Recorded calls: what a handler paid for or changed the world with (a model call,
a tool call), stored before it is used and read back instead of made again.

One key format for every call of a task: ``<task id>.g<generation>.<call>``, where
``<call>`` is ``c<n>`` for the n-th model call of the attempt and ``t<digest>`` for a
tool call (its name and arguments); a retry after a failed outcome is a new
generation (new calls), a redelivery after a crash the same one (the calls are
reused). One way to read or make one: :func:`read_or_make`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rolebus.handlers.base import CallLog

__all__ = ["call_key", "read_or_make"]

T = TypeVar("T")
Record = dict[str, Any]


def call_key(task_id: str, generation: int, call: str) -> str:
    """Where a call of a task's generation is recorded (``call``: ``c<n>`` or
    ``t<digest>``)."""
    return f"{task_id}.g{generation}.{call}"


async def read_or_make(
    calls: CallLog | None,
    key: str,
    *,
    make: Callable[[], Awaitable[tuple[T, Record]]],
    reuse: Callable[[Record], T | None] | None = None,
    unmade: Callable[[], T] | None = None,
) -> T:
    """The call's answer: read from its record when ``reuse`` takes it (None: the
    record is not this call's, and it is made again); else, when the call may not be
    made (a rerun from records only), what ``unmade`` says; else made, and its
    record stored before the answer is returned (what happens next may crash).
    Without ``reuse`` a record is never read: the call is recorded to be seen."""
    if calls is not None and reuse is not None:
        found = await calls.get(key)
        if found is not None and (reused := reuse(found)) is not None:
            return reused
    if unmade is not None:
        return unmade()
    answer, record = await make()
    if calls is not None:
        await calls.put(key, record)
    return answer
