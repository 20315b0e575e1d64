"""Pure pieces of talking to a model: reading its answer as an Outcome, a
``Retry-After`` header, who goes first under a rate limit, and keeping keys out of text."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import ValidationError

from rolebus.handlers.base import HandlerContext
from rolebus.handlers.prompt import OUTCOME_SCHEMA
from rolebus.team.roles import LlmHandler
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Outcome, Task

__all__ = [
    "MODES",
    "Mode",
    "answer_text",
    "checked_usage",
    "parse_answer",
    "request_for",
    "retry_after",
    "scrub",
    "urgency",
]

Mode = Literal["json_schema", "tool", "prompt"]
#: The ways an answer is asked for, in the order they are tried.
MODES: tuple[Mode, ...] = ("json_schema", "tool", "prompt")
TOOL = "submit_outcome"

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


def checked_usage(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    prompt_chars: int,
    answer_chars: int,
    max_tokens: int,
) -> tuple[int, int, list[str]]:
    """What a call is counted as: the server's figures, bounded by what the request
    could cost (a token is at least a character of the prompt, up to ``max_tokens``
    of answer), or estimated (about four characters a token) when it gave none."""
    if prompt_tokens <= 0 and completion_tokens <= 0 and answer_chars:
        return prompt_chars // 4 + 1, min(max_tokens, answer_chars // 4 + 1), ["estimated"]
    prompt = min(max(prompt_tokens, 0), prompt_chars + 64)
    completion = min(max(completion_tokens, 0), max_tokens)
    clamped = (prompt, completion) != (prompt_tokens, completion_tokens)
    return prompt, completion, ["clamped"] if clamped else []


def request_for(spec: LlmHandler, messages: list[dict[str, Any]], mode: Mode) -> dict[str, Any]:
    """The chat-completion request for ``mode``."""
    request: dict[str, Any] = {
        "model": spec.llm,
        "messages": messages,
        "max_tokens": spec.max_tokens,
    }
    if spec.temperature is not None:
        request["temperature"] = spec.temperature
    if mode == "json_schema":
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "outcome", "schema": OUTCOME_SCHEMA},
        }
    elif mode == "tool":
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": TOOL,
                    "description": "Submit the outcome of the task.",
                    "parameters": OUTCOME_SCHEMA,
                },
            }
        ]
        request["tool_choice"] = {"type": "function", "function": {"name": TOOL}}
    return request


def answer_text(response: Any, mode: Mode) -> str:
    """The answer in a (not streamed) response: the content, or the tool call's arguments."""
    message = response.choices[0].message
    if mode == "tool" and message.tool_calls:
        return str(message.tool_calls[0].function.arguments or "")
    return str(message.content or "")
