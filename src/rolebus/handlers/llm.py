"""The LLM handler: a role file becomes an agent behind any OpenAI-compatible server.

One task is one conversation: the prompt (:mod:`rolebus.handlers.prompt`), the
model's answer validated as an Outcome, and up to ``max_repairs`` turns that feed a
validation error back. Every call is recorded (``context.calls``) before its answer
is used, keyed by task, generation and call number: a redelivery after a crash, a
redrive or a rerun reuses the recorded answer instead of paying for it again.

Talking to the server (answer modes, retries, streaming, refusals) is
:mod:`rolebus.handlers.model_server`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from rolebus.handlers.base import BudgetBreachError, HandlerContext, NeedsLiveError
from rolebus.handlers.completion import (
    MODES,
    checked_usage,
    parse_answer,
    repair_note,
    urgency,
)
from rolebus.handlers.model_server import AttemptEndedError, ModelServer, tokens_of
from rolebus.handlers.pricing import cost_usd
from rolebus.handlers.prompt import prompt_messages
from rolebus.team.authority import breach_request, refusal
from rolebus.team.handler_specs import LlmHandler
from rolebus.wire.messages import Outcome, Task, Usage

__all__ = ["MODES", "LlmRunner", "call_key"]

T = TypeVar("T")
log = structlog.get_logger("rolebus.handlers.llm")


def call_key(task_id: str, generation: int, number: int) -> str:
    """Where call ``number`` of a task's generation is recorded."""
    return f"{task_id}.g{generation}.c{number}"


@dataclass(frozen=True)
class _Answer:
    text: str
    usage: Usage


class LlmRunner:
    """Runs a task through a model; see the module's documentation."""

    def __init__(self, spec: LlmHandler) -> None:
        self.spec = spec
        self.name = f"llm:{spec.llm}"
        self.server = ModelServer(spec)
        self._flagged: set[str] = set()  # the usage checks already warned about

    async def aclose(self) -> None:
        """Close the HTTP clients (the worker calls it when it stops)."""
        await self.server.aclose()

    @property
    def base_url(self) -> str | None:
        return self.server.base_url

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        base: list[dict[str, Any]] = list(prompt_messages(task, context))
        messages = base
        # The key is read now, at call time, and goes only into the request header.
        key = os.environ.get(self.spec.api_key_env) or ""
        usage = Usage(model=self.spec.llm)
        problem = ""
        refused: str | None = None
        try:
            for number in range(1, self.spec.max_repairs + 2):
                answer = await self._answer(messages, task, context, number, key)
                usage = usage.plus(answer.usage)
                outcome, problem = parse_answer(answer.text)
                refused = refusal(outcome, context.role) if outcome is not None else None
                if outcome is not None and refused is None:
                    return outcome.model_copy(update={"usage": usage})
                problem = refused or problem
                # One repair turn at a time, on the first request: the conversation of
                # an attempt grows by one note, not by every answer so far.
                messages = [*base, repair_note(answer.text, problem, refused=refused is not None)]
        except AttemptEndedError as failed:
            return failed.outcome.model_copy(update={"usage": usage if usage.calls else None})
        except BudgetBreachError as breach:
            breach.usage = usage if usage.calls else None
            raise
        if refused:  # asked again and again for what only the bus decides: not a retry
            return Outcome.failed(
                f"refused after {self.spec.max_repairs} repair turn(s): {problem}",
                retryable=False,
            ).model_copy(update={"usage": usage})
        return Outcome.failed(
            f"the model's answer is not a valid outcome after {self.spec.max_repairs} "
            f"repair turn(s): {problem}",
            retryable=True,
        ).model_copy(update={"usage": usage})

    # --- one call, recorded --------------------------------------------------------

    async def _answer(
        self,
        messages: list[dict[str, Any]],
        task: Task,
        context: HandlerContext,
        number: int,
        key: str,
    ) -> _Answer:
        record_key = call_key(task.id, context.generation, number)
        fingerprint = self._fingerprint(messages)
        if context.calls is not None:
            recorded = await context.calls.get(record_key)
            if recorded is not None and recorded.get("fingerprint") == fingerprint:
                usage = Usage.model_validate(
                    {**recorded["usage"], "latency_ms": recorded.get("latency_ms", 0.0)}
                )
                return _Answer(
                    str(recorded["answer"]),
                    usage.model_copy(update={"calls": 0, "reused_calls": 1}),
                )
            if context.extra.get("recorded_only"):
                raise NeedsLiveError(number)
        reserved = await self._reserve(messages, context)
        started = time.monotonic()
        try:
            if context.limiter is not None:
                await context.limiter.acquire(
                    tokens_of(messages, self.spec.max_tokens), urgency(task, context)
                )
                started = time.monotonic()
            text, mode, prompt_tokens, completion_tokens = await self.server.call(
                messages, key, context
            )
        except BaseException:
            if reserved is not None and context.budget is not None:
                await context.budget.settle(reserved, (0, 0.0))  # a refused call costs nothing
            raise
        latency = time.monotonic() - started
        reported = (prompt_tokens, completion_tokens)
        prompt_tokens, completion_tokens, flags = checked_usage(
            *reported,
            prompt_chars=len(json.dumps(messages)),
            answer_chars=len(text),
            max_tokens=self.spec.max_tokens,
        )
        if flags and flags[0] not in self._flagged:
            self._flagged.add(flags[0])  # once per kind: a server that does it, does it always
            log.warning(
                "model server's usage figures were " + flags[0],
                model=self.spec.llm,
                reported=list(reported),
                counted=[prompt_tokens, completion_tokens],
            )
        usage = Usage(
            model=self.spec.llm,
            calls=1,
            flags=flags,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd(
                self.spec.llm,
                prompt_tokens,
                completion_tokens,
                base_url=self.base_url,
                prices=self.spec.prices,
            ),
            latency_ms=round(latency * 1000, 1),
        )
        if reserved is not None and context.budget is not None:
            await context.budget.settle(reserved, (usage.tokens, usage.cost_usd or 0.0))
        if context.calls is not None:
            # Stored before the answer is acted on: what happens next may crash.
            await context.calls.put(
                record_key,
                {
                    "task_id": task.id,
                    "generation": context.generation,
                    "number": number,
                    "fingerprint": fingerprint,
                    "model": self.spec.llm,
                    "base_url": self.base_url,
                    "mode": mode,
                    "messages": messages,
                    "answer": text,
                    "usage": usage.model_dump(mode="json", exclude_defaults=True),
                    "latency_ms": round(latency * 1000, 1),
                },
            )
        return _Answer(text, usage)

    async def _reserve(
        self, messages: list[dict[str, Any]], context: HandlerContext
    ) -> tuple[int, float] | None:
        """Count the call's worst case against the role's budget before making it; a
        call that would pass a cap does not happen: the task asks the approver."""
        if context.budget is None:
            return None
        worst = tokens_of(messages, self.spec.max_tokens)
        prompt = worst - self.spec.max_tokens
        worst_usd = cost_usd(
            self.spec.llm,
            prompt,
            self.spec.max_tokens,
            base_url=self.base_url,
            prices=self.spec.prices,
        )
        breach = await context.budget.reserve(worst, worst_usd)
        if breach is not None:
            raise BudgetBreachError(breach_request(context.role, breach, usd=worst_usd))
        return worst, worst_usd or 0.0

    def _fingerprint(self, messages: list[dict[str, Any]]) -> str:
        request = {
            "model": self.spec.llm,
            "messages": messages,
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
