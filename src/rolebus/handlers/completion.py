"""Pure pieces of talking to a model: reading its answer as an Outcome, a
``Retry-After`` header, who goes first under a rate limit, and keeping keys out of text."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import ValidationError

from rolebus.handlers.base import HandlerContext
from rolebus.handlers.prompt import OUTCOME_SCHEMA
from rolebus.team.handler_specs import LlmHandler
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Outcome, Task

__all__ = [
    "EXCERPT",
    "MODES",
    "Mode",
    "Refusal",
    "answer_text",
    "checked_usage",
    "overflow_outcome",
    "parse_answer",
    "refusal_kind",
    "refused_outcome",
    "repair_note",
    "request_for",
    "retry_after",
    "scrub",
    "tokens_in",
    "tool_calls_in",
    "urgency",
]

Mode = Literal["json_schema", "json_object", "tool", "prompt"]
#: The ways an answer is asked for, in the order ``auto`` tries them.
MODES: tuple[Mode, ...] = ("json_schema", "json_object", "tool", "prompt")
#: What a server's refusal means: the request's size, the answer mode, busy, or else.
Refusal = Literal["overflow", "mode", "busy", "other"]
#: How servers say a request does not fit the model's context (OpenAI, vLLM,
#: llama.cpp and llama-cpp-python, Ollama).
_OVERFLOW = (
    "context length",
    "context_length",
    "context window",
    "context size",
    "exceed_context",
    "too many tokens",
    "prompt is too long",
)
#: What names the answer mode in a refusal (llama.cpp answers an unknown one with 500).
_MODE_WORDS = ("response_format", "json_schema", "json_object", "tools", "tool_choice", "grammar")
#: How much of a bad answer a repair turn quotes back (the rest costs context).
EXCERPT = 300
TOOL = "submit_outcome"

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_answer(text: str) -> tuple[Outcome | None, str]:
    """The outcome in a model's answer, or None and what is wrong with it (its form,
    or what an outcome of its status must carry)."""
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
        outcome = Outcome.model_validate(value)
    except ValidationError as error:
        return None, validation_problems(error)
    missing = {"handoff": "handoff", "escalate": "escalation"}.get(outcome.status)
    if missing is not None and getattr(outcome, missing) is None:
        return None, f"status {outcome.status!r} needs {missing!r} (see the protocol)"
    return outcome, ""


def refusal_kind(status: int, message: str) -> Refusal:
    """What a refused request means. A context overflow is never a refused mode (it
    is the request's size, whatever the mode), and a 500 is a refused mode only when
    it names the mode's fields: else the server is busy."""
    text = message.lower()
    if any(marker in text for marker in _OVERFLOW):
        return "overflow"
    if status in (400, 422) or (status >= 500 and any(word in text for word in _MODE_WORDS)):
        return "mode"
    if status == 429 or status >= 500:
        return "busy"
    return "other"


def repair_note(answer: str, problem: str, *, refused: bool) -> dict[str, str]:
    """The turn that asks again: the error and a bounded excerpt of the answer, not
    the whole answer (which may fill a small model's context)."""
    excerpt = " ".join(answer.split())
    if len(excerpt) > EXCERPT:
        excerpt = excerpt[: EXCERPT - 1] + "…"
    why = "is refused" if refused else "is not a valid outcome"
    return {
        "role": "user",
        "content": f"Your answer {why}: {problem}. It began: «{excerpt}». "
        "Answer again with the corrected JSON object only.",
    }


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


def request_for(
    spec: LlmHandler,
    messages: list[dict[str, Any]],
    mode: Mode,
    *,
    max_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The chat-completion request for ``mode`` (``tools``: the role's tools, which
    the model may call before it answers)."""
    request: dict[str, Any] = {
        "model": spec.llm,
        "messages": messages,
        "max_tokens": spec.max_tokens if max_tokens is None else max_tokens,
    }
    if spec.temperature is not None:
        request["temperature"] = spec.temperature
    if mode == "json_schema":
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "outcome", "schema": OUTCOME_SCHEMA},
        }
    elif mode == "json_object":  # llama.cpp's and others' form: JSON, the schema beside it
        request["response_format"] = {"type": "json_object", "schema": OUTCOME_SCHEMA}
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
    if tools:
        # The outcome is one more function among the role's: the model calls some,
        # then submits (tool mode), or answers in the asked format.
        request["tools"] = [*request.get("tools", []), *tools]
        request["tool_choice"] = "required" if mode == "tool" else "auto"
    return request


def tool_calls_in(response: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The role-tool calls in a (not streamed) response: (id, name, arguments), the
    outcome's own function left out."""
    choices = response.get("choices")
    message = choices[0].get("message") if isinstance(choices, list) and choices else None
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    found = []
    for number, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or function.get("name") in (None, TOOL):
            continue
        arguments = function.get("arguments")
        found.append(
            (
                str(call.get("id") or f"call_{number}"),
                str(function["name"]),
                arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
        )
    return found


def answer_text(response: dict[str, Any], mode: Mode, *, part: str = "message") -> str:
    """The answer in a response: the content, or the tool call's arguments ("" for a
    response of another shape: the repair turn says so). ``part="delta"``: the piece
    a streamed chunk carries."""
    choices = response.get("choices")
    message = choices[0].get(part) if isinstance(choices, list) and choices else None
    if not isinstance(message, dict):
        return ""
    calls = message.get("tool_calls")
    if mode == "tool" and isinstance(calls, list) and calls and isinstance(calls[0], dict):
        function = calls[0].get("function")
        arguments = function.get("arguments") if isinstance(function, dict) else None
        return arguments if isinstance(arguments, str) else ""
    content = message.get("content")
    return content if isinstance(content, str) else ""


def tokens_in(usage: Any) -> tuple[int, int]:
    """A usage object's prompt and completion tokens (0 where it says nothing usable;
    :func:`checked_usage` judges the numbers)."""
    if not isinstance(usage, dict):
        return 0, 0

    def count(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return count("prompt_tokens"), count("completion_tokens")


def overflow_outcome(spec: LlmHandler, where: str, said: str) -> Outcome:
    """A request that does not fit the model's context: retryable (a shorter prompt
    may fit), naming the settings that make it fit."""
    window = f" of {spec.context_window} tokens" if spec.context_window else ""
    return Outcome.failed(
        f"the request does not fit the model's context window{window} at {where}: {said}; "
        f"lower handler.max_tokens ({spec.max_tokens}) or handler.max_repairs "
        f"({spec.max_repairs}), or set handler.context_window to the model's",
        retryable=True,
    )


def refused_outcome(
    spec: LlmHandler, where: str, error: Any, key: str, mode: Mode | None = None
) -> Outcome:
    """The server refused the request for good (``mode``: the answer mode it refused,
    the last one tried)."""
    tried = ""
    if mode is not None:
        tried = (
            f" (answer mode {mode}, handler.mode = {spec.mode!r}: set handler.mode to one "
            "this server honours: auto, json_schema, json_object, tool or prompt)"
        )
    return Outcome.failed(
        f"the model server at {where} refused the request "
        f"({error.status_code}): {scrub(error.message, key)}{tried}",
        retryable=False,
    )
