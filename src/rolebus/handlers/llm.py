"""The LLM handler: a role file becomes an agent behind any OpenAI-compatible server.

One task is one conversation: the prompt (:mod:`rolebus.handlers.prompt`), the
model's answer validated as an Outcome, and up to ``max_repairs`` turns that feed a
validation error back. Every call is recorded (``context.calls``, see
:mod:`rolebus.handlers.recorded`) before its answer is used: a redelivery after a
crash, a redrive or a rerun reuses the recorded answer instead of paying for it
again. Tool calls are :mod:`rolebus.handlers.tool_turns`'.

Talking to the server (answer modes, retries, streaming, refusals) is
:mod:`rolebus.handlers.model_server`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
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
from rolebus.handlers.recorded import call_key, read_or_make
from rolebus.handlers.tool_turns import Attempt, tool_turn
from rolebus.handlers.tools import Toolbox, ToolError
from rolebus.team.authority import breach_request, model_refusal
from rolebus.team.handler_specs import LlmHandler
from rolebus.wire.messages import Outcome, Task, Usage

__all__ = ["MODES", "LlmRunner"]

T = TypeVar("T")
log = structlog.get_logger("rolebus.handlers.llm")


@dataclass(frozen=True)
class _Answer:
    text: str
    usage: Usage
    #: The role-tool calls it asked for: (id, name, arguments).
    calls: list[tuple[str, str, str]] = field(default_factory=list)


class LlmRunner:
    """Runs a task through a model; see the module's documentation."""

    def __init__(self, spec: LlmHandler) -> None:
        self.spec = spec
        self.name = f"llm:{spec.llm}"
        self.server = ModelServer(spec)
        self._flagged: set[str] = set()  # the usage checks already warned about
        self._toolboxes: dict[str, Toolbox] = {}  # by role id

    async def aclose(self) -> None:
        """Close the HTTP clients (the worker calls it when it stops)."""
        await self.server.aclose()

    @property
    def base_url(self) -> str | None:
        return self.server.base_url

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        base: list[dict[str, Any]] = list(prompt_messages(task, context))
        # The key is read now, at call time, and goes only into the request header.
        key = os.environ.get(self.spec.api_key_env) or ""
        run = Attempt(Usage(model=self.spec.llm), self._toolbox(context))
        try:
            tools = await run.toolbox.definitions() if run.toolbox else None
        except ToolError as error:
            return Outcome.failed(f"{error.message} ({error.hint})", retryable=False)
        conversation = messages = base  # the conversation grows by tool turns only
        problem = ""
        refused: str | None = None
        repairs = steps = 0
        try:
            while True:
                run.number += 1
                answer = await self._answer(messages, task, context, run.number, key, tools)
                run.usage = run.usage.plus(answer.usage)
                if answer.calls:
                    steps += 1
                    if steps > self.spec.max_tool_steps:
                        return Outcome.failed(
                            f"the model asked for tools more than {self.spec.max_tool_steps} "
                            "times (handler.max_tool_steps)",
                            retryable=False,
                        ).model_copy(update={"usage": run.usage})
                    turn = await tool_turn(answer.calls, answer.text, task, context, run)
                    if isinstance(turn, Outcome):  # a boundary: the task asks first
                        return turn.model_copy(update={"usage": run.usage})
                    conversation = messages = [*messages, *turn]
                    continue
                outcome, problem = parse_answer(answer.text)
                refused = model_refusal(outcome, context.role) if outcome is not None else None
                if outcome is not None and refused is None:
                    return outcome.model_copy(update={"usage": run.usage})
                problem = refused or problem
                repairs += 1
                if repairs > self.spec.max_repairs:
                    break
                # One repair turn at a time, on the conversation: an attempt grows by
                # one note, not by every answer so far.
                note = repair_note(answer.text, problem, refused=refused is not None)
                messages = [*conversation, note]
        except AttemptEndedError as failed:
            usage = run.usage if run.usage.calls else None
            return failed.outcome.model_copy(update={"usage": usage})
        except BudgetBreachError as breach:
            breach.usage = run.usage if run.usage.calls else None
            raise
        if refused:  # asked again and again for what only the bus decides: not a retry
            return Outcome.failed(
                f"refused after {self.spec.max_repairs} repair turn(s): {problem}",
                retryable=False,
            ).model_copy(update={"usage": run.usage})
        return Outcome.failed(
            f"the model's answer is not a valid outcome after {self.spec.max_repairs} "
            f"repair turn(s): {problem}",
            retryable=True,
        ).model_copy(update={"usage": run.usage})

    def _toolbox(self, context: HandlerContext) -> Toolbox:
        toolbox = self._toolboxes.get(context.role.id)
        if toolbox is None or toolbox.role != context.role:
            toolbox = self._toolboxes[context.role.id] = Toolbox(context.role)
        return toolbox

    # --- one call, recorded --------------------------------------------------------

    async def _answer(
        self,
        messages: list[dict[str, Any]],
        task: Task,
        context: HandlerContext,
        number: int,
        key: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> _Answer:
        """Model call ``number``: from its record when the request is the same,
        else asked (and recorded before its answer is used)."""
        fingerprint = self._fingerprint(messages, tools)

        def reuse(recorded: dict[str, Any]) -> _Answer | None:
            if recorded.get("fingerprint") != fingerprint:
                return None
            usage = Usage.model_validate(
                {**recorded["usage"], "latency_ms": recorded.get("latency_ms", 0.0)}
            )
            return _Answer(
                str(recorded["answer"]),
                usage.model_copy(update={"calls": 0, "reused_calls": 1}),
                [tuple(call) for call in recorded.get("tool_calls", [])],
            )

        def unmade() -> _Answer:
            raise NeedsLiveError(number)

        return await read_or_make(
            context.calls,
            call_key(task.id, context.generation, f"c{number}"),
            make=lambda: self._ask(messages, task, context, number, key, tools, fingerprint),
            reuse=reuse,
            unmade=unmade
            if context.calls is not None and context.extra.get("recorded_only")
            else None,
        )

    async def _ask(
        self,
        messages: list[dict[str, Any]],
        task: Task,
        context: HandlerContext,
        number: int,
        key: str,
        tools: list[dict[str, Any]] | None,
        fingerprint: str,
    ) -> tuple[_Answer, dict[str, Any]]:
        """Ask the model server (within the budget and the rate limit); the answer
        and its record."""
        reserved = await self._reserve(messages, context)
        started = time.monotonic()
        try:
            if context.limiter is not None:
                await context.limiter.acquire(
                    tokens_of(messages, self.spec.max_tokens), urgency(task, context)
                )
                started = time.monotonic()
            text, mode, prompt_tokens, completion_tokens, calls = await self.server.call(
                messages, key, context, tools
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
        record = {
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
            **({"tool_calls": [list(call) for call in calls]} if calls else {}),
        }
        return _Answer(text, usage, calls), record

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

    def _fingerprint(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        request = {
            "model": self.spec.llm,
            "messages": messages,
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
            **({"tools": tools} if tools else {}),
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
