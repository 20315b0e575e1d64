"""Pure pieces of talking to a model: reading its answer as an Outcome, a
``Retry-After`` header, who goes first under a rate limit, and keeping keys out of text."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from rolebus.handlers.base import HandlerContext
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Outcome, Task

__all__ = ["parse_answer", "retry_after", "scrub", "urgency"]

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_answer(text: str) -> tuple[Outcome | None, str]:
    """The outcome in a model's answer, or None and what is wrong with it."""
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text.strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as error:
        return None, f"it is not JSON ({error})"
    if not isinstance(value, dict):
        return None, f"it is a JSON {type(value).__name__}, not an object with 'status'"
    value.pop("usage", None)  # the bus's to fill
    try:
        return Outcome.model_validate(value), ""
    except ValidationError as error:
        return None, validation_problems(error)


def urgency(task: Task, context: HandlerContext) -> int:
    """Who goes first when the rate limit is short: someone waiting on an answer
    (an escalation to decide, a resumed task), then by the task's priority."""
    if context.extra.get("input") == "escalation" or context.decisions:
        return 1 << 40
    return task.priority or 0


def retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def scrub(text: str, key: str) -> str:
    """Never let a key into an error (and so an event, a log or a page)."""
    return text.replace(key, "***") if key and len(key) >= 4 else text
