"""The LLM handler: a role file becomes an agent behind any OpenAI-compatible server.

One task is one conversation: the prompt (:mod:`rolebus.handlers.prompt`), the
model's answer validated as an Outcome, and up to ``max_repairs`` turns that feed a
validation error back. Every call is recorded (``context.calls``) before its answer
is used, keyed by task, generation and call number: a redelivery after a crash, a
redrive or a rerun reuses the recorded answer instead of paying for it again.

Servers differ in what they accept, so the answer is asked for three ways, in this
order, and the first the server takes is kept for the next tasks: a JSON schema
(``response_format``), a forced tool call, and a plain prompted JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
import structlog

from rolebus.handlers.base import BudgetBreachError, HandlerContext
from rolebus.handlers.completion import (
    MODES,
    Mode,
    answer_text,
    checked_usage,
    parse_answer,
    request_for,
    retry_after,
    scrub,
    urgency,
)
from rolebus.handlers.pricing import cost_usd
from rolebus.handlers.prompt import prompt_messages
from rolebus.team.authority import breach_request, refusal
from rolebus.team.roles import LlmHandler
from rolebus.wire.messages import Outcome, Task, Usage

__all__ = ["MODES", "LlmRunner", "call_key"]

T = TypeVar("T")
log = structlog.get_logger("rolebus.handlers.llm")


def call_key(task_id: str, generation: int, number: int) -> str:
    """Where call ``number`` of a task's generation is recorded."""
    return f"{task_id}.g{generation}.c{number}"


class _AttemptEndedError(Exception):
    """A call that ends the task's attempt with ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass(frozen=True)
class _Answer:
    text: str
    usage: Usage


class LlmRunner:
    """Runs a task through a model; see the module's documentation."""

    def __init__(self, spec: LlmHandler) -> None:
        self.spec = spec
        self.name = f"llm:{spec.llm}"
        self._mode: Mode | None = None  # the first mode this server accepted
        self._streams = spec.stream  # until the server refuses to stream
        self._flagged: set[str] = set()  # the usage checks already warned about
        # One client (its connection pool) per URL and key: the key is still read at
        # every call, and a changed one gets a new client.
        self._clients: dict[tuple[str | None, str], openai.AsyncOpenAI] = {}

    def _client(self, key: str) -> openai.AsyncOpenAI:
        client = self._clients.get((self.base_url, key))
        if client is None:
            client = self._clients[(self.base_url, key)] = openai.AsyncOpenAI(
                api_key=key or "unset",  # local servers (Ollama, llama.cpp) need none
                base_url=self.base_url,
                timeout=self.spec.timeout,
                max_retries=0,  # retries are ours: they honour Retry-After and are logged
            )
        return client

    async def _exchange(
        self, client: openai.AsyncOpenAI, call: Coroutine[Any, Any, T], timeout: float
    ) -> T:
        """Wait for one HTTP exchange. To stop it (a timeout, a cancel) its client is
        closed rather than the request cancelled mid-way: httpx can strand the
        connection it was cancelled in, and closing the pool later waits for it for
        ever. The next call opens a new client."""
        exchange = asyncio.ensure_future(call)
        try:
            return await asyncio.wait_for(asyncio.shield(exchange), timeout)
        except BaseException:
            if not exchange.done():
                self._clients = {k: c for k, c in self._clients.items() if c is not client}
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 5.0)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(exchange, 5.0)  # it fails: its connection closed
            raise

    async def aclose(self) -> None:
        """Close the HTTP clients (the worker calls it when it stops)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    @property
    def base_url(self) -> str | None:
        return self.spec.base_url or os.environ.get("OPENAI_BASE_URL") or None

    @property
    def _where(self) -> str:
        return self.base_url or "the OpenAI API"

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        messages: list[dict[str, Any]] = list(prompt_messages(task, context))
        # The key is read now, at call time, and goes only into the request header.
        key = os.environ.get(self.spec.api_key_env) or ""
        usage = Usage(model=self.spec.llm)
        problem = ""
        refused: str | None = None
        client = self._client(key)
        try:
            for number in range(1, self.spec.max_repairs + 2):
                answer = await self._answer(client, messages, task, context, number, key)
                usage = usage.plus(answer.usage)
                outcome, problem = parse_answer(answer.text)
                refused = refusal(outcome, context.role) if outcome is not None else None
                if outcome is not None and refused is None:
                    return outcome.model_copy(update={"usage": usage})
                problem = refused or problem
                why = "is refused" if refused else "is not a valid outcome"
                messages += [
                    {"role": "assistant", "content": answer.text},
                    {
                        "role": "user",
                        "content": f"That answer {why}: {problem}. "
                        "Answer again with the corrected JSON object only.",
                    },
                ]
        except _AttemptEndedError as failed:
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
        client: openai.AsyncOpenAI,
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
                usage = Usage.model_validate(recorded["usage"])
                return _Answer(
                    str(recorded["answer"]),
                    usage.model_copy(update={"calls": 0, "reused_calls": 1}),
                )
            if context.extra.get("recorded_only"):
                raise _AttemptEndedError(
                    Outcome.failed(
                        f"no recorded answer for call {number} of this task "
                        "(`rolebus rerun --live` calls the model)",
                        retryable=False,
                    )
                )
        reserved = await self._reserve(messages, context)
        started = time.monotonic()
        try:
            if context.limiter is not None:
                await context.limiter.acquire(self._tokens(messages), urgency(task, context))
                started = time.monotonic()
            text, mode, prompt_tokens, completion_tokens = await self._call(
                client, messages, key, context
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
                    "usage": usage.model_dump(mode="json"),
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
        worst = self._tokens(messages)
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

    def _tokens(self, messages: list[dict[str, Any]]) -> int:
        """A call's worst case: the prompt (~3 characters a token at least) and
        ``max_tokens``."""
        return len(json.dumps(messages)) // 3 + 1 + self.spec.max_tokens

    def _fingerprint(self, messages: list[dict[str, Any]]) -> str:
        request = {
            "model": self.spec.llm,
            "messages": messages,
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    async def _call(
        self,
        client: openai.AsyncOpenAI,
        messages: list[dict[str, Any]],
        key: str,
        context: HandlerContext,
    ) -> tuple[str, Mode, int, int]:
        """The model's answer text, the mode that got it, and the tokens."""
        modes = MODES[MODES.index(self._mode) :] if self._mode else MODES
        for mode in modes:
            try:
                text, prompt_tokens, completion_tokens = await self._with_retries(
                    client, messages, mode, key, context
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
                if mode == MODES[-1]:
                    raise _AttemptEndedError(self._refused(error, key)) from error
                log.info(
                    "model server refused this answer mode; trying the next",
                    model=self.spec.llm,
                    mode=mode,
                    status=error.status_code,
                )
                continue
            self._mode = mode
            return text, mode, prompt_tokens, completion_tokens
        raise AssertionError("unreachable: the last mode raises")

    async def _complete(
        self,
        client: openai.AsyncOpenAI,
        request: dict[str, Any],
        mode: Mode,
        context: HandlerContext,
    ) -> tuple[str, int, int]:
        """One completion: its text and tokens. Streamed when the server allows it, so
        that a long answer shows as progress (the reporter throttles it)."""
        if self._streams:
            try:
                return await self._streamed(client, request, mode, context)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
                # Refused: the streaming (the server says so), or the answer mode?
                if "stream" not in str(error.message).lower():
                    raise
                response = await client.chat.completions.create(**request)
                self._streams = False
                log.info("model server does not stream; asking without", model=self.spec.llm)
        else:
            response = await client.chat.completions.create(**request)
        usage = response.usage
        return (
            answer_text(response, mode),
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def _streamed(
        self,
        client: openai.AsyncOpenAI,
        request: dict[str, Any],
        mode: Mode,
        context: HandlerContext,
    ) -> tuple[str, int, int]:
        stream = await client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        parts: list[str] = []
        prompt_tokens = completion_tokens = chunks = 0
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    prompt_tokens = int(chunk.usage.prompt_tokens or 0)
                    completion_tokens = int(chunk.usage.completion_tokens or 0)
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if mode == "tool" and delta.tool_calls:
                    function = delta.tool_calls[0].function
                    parts.append((function.arguments if function else None) or "")
                elif delta.content:
                    parts.append(delta.content)
                else:
                    continue
                chunks += 1
                await context.progress("the model is answering", chunks=chunks)
        return "".join(parts), prompt_tokens, completion_tokens

    async def _with_retries(
        self,
        client: openai.AsyncOpenAI,
        messages: list[dict[str, Any]],
        mode: Mode,
        key: str,
        context: HandlerContext,
    ) -> tuple[str, int, int]:
        """One request; 429 and 5xx are retried after Retry-After (or a backoff)."""
        request = request_for(self.spec, messages, mode)
        for retry in range(self.spec.max_retries + 1):
            try:
                # A server that trickles bytes must not hold the slot past the timeout.
                return await self._exchange(
                    client, self._complete(client, request, mode, context), self.spec.timeout
                )
            except (openai.RateLimitError, openai.InternalServerError) as error:
                if retry == self.spec.max_retries:
                    raise _AttemptEndedError(
                        Outcome.failed(
                            f"the model server at {self._where} answered {error.status_code} "
                            f"{retry + 1} time(s): {scrub(error.message, key)}",
                            retryable=True,
                        )
                    ) from error
                # Capped: a Retry-After of an hour must not stop a role for an hour.
                delay = min(
                    retry_after(error.response.headers) or min(30.0, 2.0**retry),
                    self.spec.max_retry_after,
                )
                log.info(
                    "model server busy; retrying",
                    model=self.spec.llm,
                    status=error.status_code,
                    delay_s=delay,
                )
                if context.limiter is not None:
                    # Every worker waits, not just this one; the retry takes its slot.
                    await context.limiter.slow_down(delay)
                    await context.limiter.acquire(self._tokens(messages))
                else:
                    await asyncio.sleep(delay)
            except (TimeoutError, openai.APITimeoutError) as error:
                raise _AttemptEndedError(
                    Outcome.failed(
                        f"no answer from the model server at {self._where} within "
                        f"{self.spec.timeout:g}s",
                        retryable=True,
                    )
                ) from error
            except openai.APIConnectionError as error:
                raise _AttemptEndedError(
                    Outcome.failed(
                        f"cannot reach the model server at {self._where}: "
                        f"{scrub(str(error.__cause__ or error), key)}",
                        retryable=True,
                    )
                ) from error
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise _AttemptEndedError(
                    Outcome.failed(
                        f"the model server at {self._where} refused the key "
                        f"({error.status_code}): set {self.spec.api_key_env} to a key it "
                        f"accepts (the role file's handler.api_key_env names the variable"
                        f"{'; it is not set' if not key else ''})",
                        retryable=False,
                    )
                ) from error
            except openai.NotFoundError as error:
                raise _AttemptEndedError(
                    Outcome.failed(
                        f"the model server at {self._where} does not know model "
                        f"{self.spec.llm!r} (404): fix handler.llm in the role file, or "
                        "handler.base_url",
                        retryable=False,
                    )
                ) from error
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                raise
            except openai.APIStatusError as error:
                raise _AttemptEndedError(self._refused(error, key)) from error
        raise AssertionError("unreachable: the last retry raises")

    def _refused(self, error: openai.APIStatusError, key: str) -> Outcome:
        return Outcome.failed(
            f"the model server at {self._where} refused the request "
            f"({error.status_code}): {scrub(error.message, key)}",
            retryable=False,
        )
