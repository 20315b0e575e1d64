"""Talking to one OpenAI-compatible model server: its client pool, the answer modes
it honours, retries after Retry-After, streaming, and what its refusals mean.

Servers differ in what they accept, so ``auto`` asks for the answer four ways, in
this order, and keeps the first the server takes: a JSON schema
(``response_format: json_schema``), JSON with the schema beside it
(``json_object``, llama.cpp's form), a forced tool call, and a plain prompted JSON
answer. A refusal of the mode moves to the next; a context overflow is never taken
for one (it is the request's size), and a 500 is a refused mode only when it names
the mode's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Coroutine
from typing import Any, NamedTuple, TypeVar

import structlog

from rolebus.handlers.base import HandlerContext
from rolebus.handlers.chat_http import (
    ChatClient,
    ModelHttpError,
    ModelTimeoutError,
    ModelUnreachableError,
)
from rolebus.handlers.completion import (
    MODES,
    Mode,
    answer_text,
    overflow_outcome,
    refusal_kind,
    refused_outcome,
    request_for,
    retry_after,
    scrub,
    tokens_in,
    tool_calls_in,
)
from rolebus.team.handler_specs import LlmHandler
from rolebus.wire.messages import Outcome

__all__ = ["Answered", "AttemptEndedError", "ModelServer", "tokens_of"]

T = TypeVar("T")
log = structlog.get_logger("rolebus.handlers.llm")


def tokens_of(messages: list[dict[str, Any]], max_tokens: int) -> int:
    """A call's worst case: the prompt (~3 characters a token at least) and
    ``max_tokens``."""
    return len(json.dumps(messages)) // 3 + 1 + max_tokens


class Answered(NamedTuple):
    """A model's answer: its text (the outcome, when it gave one), the mode that got
    it, the tokens, and the role-tool calls it asked for (id, name, arguments)."""

    text: str
    mode: Mode
    prompt_tokens: int
    completion_tokens: int
    calls: list[tuple[str, str, str]]


class _ModeRefusedError(Exception):
    """The server refused the answer mode of a request (not its size, not busy)."""

    def __init__(self, error: ModelHttpError) -> None:
        super().__init__(error.message)
        self.error = error


class _EmptyStreamError(Exception):
    """A stream that ended without a single chunk."""


class AttemptEndedError(Exception):
    """A call that ends the task's attempt with ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class ModelServer:
    """One role's model server (see the module's documentation)."""

    def __init__(self, spec: LlmHandler) -> None:
        self.spec = spec
        self._mode: Mode | None = None  # the first mode this server accepted
        self._streams = spec.stream  # until the server refuses to stream
        # One client (its connection pool) per URL and key: the key is still read at
        # every call, and a changed one gets a new client.
        self._clients: dict[tuple[str | None, str], ChatClient] = {}

    def _client(self, key: str) -> ChatClient:
        client = self._clients.get((self.base_url, key))
        if client is None:
            client = self._clients[(self.base_url, key)] = ChatClient(
                self.base_url, key, self.spec.timeout
            )
        return client

    async def _exchange(
        self, client: ChatClient, call: Coroutine[Any, Any, T], timeout: float
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
    def where(self) -> str:
        return self.base_url or "the OpenAI API"

    def _modes(self) -> tuple[Mode, ...]:
        """The answer modes to try: the role file's, or (auto) from the first this
        server honoured."""
        if self.spec.mode != "auto":
            return (self.spec.mode,)
        return MODES[MODES.index(self._mode) :] if self._mode else MODES

    async def call(
        self,
        messages: list[dict[str, Any]],
        key: str,
        context: HandlerContext,
        tools: list[dict[str, Any]] | None = None,
    ) -> Answered:
        """The model's answer (``tools``: the role's, which it may call instead)."""
        client = self._client(key)
        modes = self._modes()
        for mode in modes:
            try:
                text, prompt_tokens, completion_tokens, calls = await self._with_retries(
                    client, messages, mode, key, context, tools
                )
            except _ModeRefusedError as refused:
                if mode == modes[-1]:
                    raise AttemptEndedError(
                        refused_outcome(self.spec, self.where, refused.error, key, mode)
                    ) from refused
                log.info(
                    "model server refused this answer mode; trying the next",
                    model=self.spec.llm,
                    mode=mode,
                    status=refused.error.status_code,
                )
                continue
            self._mode = mode
            return Answered(text, mode, prompt_tokens, completion_tokens, calls)
        raise AssertionError("unreachable: the last mode raises")

    def _max_tokens(self, messages: list[dict[str, Any]]) -> int:
        """``max_tokens``, made to fit the role file's ``context_window`` with the
        prompt (about three characters a token at least); a prompt that leaves no room
        fails retryable, naming the settings."""
        window = self.spec.context_window
        if window is None:
            return self.spec.max_tokens
        room = window - len(json.dumps(messages)) // 3
        if room < 64:
            raise AttemptEndedError(
                overflow_outcome(
                    self.spec, self.where, f"the prompt alone is about {window - room} tokens"
                )
            )
        return min(self.spec.max_tokens, room)

    async def _complete(
        self,
        client: ChatClient,
        request: dict[str, Any],
        mode: Mode,
        context: HandlerContext,
    ) -> tuple[str, int, int, list[tuple[str, str, str]]]:
        """One completion: its text, tokens and tool calls. Streamed when the server
        allows it, so that a long answer shows as progress (the reporter throttles
        it); not when the role has tools (their calls are read whole)."""
        if self._streams and request.get("tool_choice") not in ("auto", "required"):
            try:
                return (*await self._streamed(client, request, mode, context), [])
            except ModelHttpError as error:
                # Refused: the streaming (the server says so), or the answer mode?
                if error.status_code not in (400, 422) or "stream" not in error.body.lower():
                    raise
                response = await client.complete(request)
                self._streams = False
                log.info("model server does not stream; asking without", model=self.spec.llm)
            except (ModelUnreachableError, _EmptyStreamError):
                # Some servers (llama-cpp-python) answer a request they cannot serve, an
                # over-long prompt say, with an empty stream that breaks off: asked again
                # without streaming, they give the answer or the error they mean.
                log.info("model server's stream broke off; asking without", model=self.spec.llm)
                try:
                    response = await client.complete(request)
                except ModelUnreachableError:
                    # The broken stream's pooled connection may be the one reused: once
                    # more, on a new one (a server that is down fails this too).
                    response = await client.complete(request)
        else:
            response = await client.complete(request)
        return (
            answer_text(response, mode),
            *tokens_in(response.get("usage")),
            tool_calls_in(response),
        )

    async def _streamed(
        self,
        client: ChatClient,
        request: dict[str, Any],
        mode: Mode,
        context: HandlerContext,
    ) -> tuple[str, int, int]:
        parts: list[str] = []
        prompt_tokens = completion_tokens = chunks = 0
        async for chunk in client.stream(request):
            if chunk.get("usage") is not None:
                prompt_tokens, completion_tokens = tokens_in(chunk["usage"])
            part = answer_text(chunk, mode, part="delta")
            if not part:
                continue
            parts.append(part)
            chunks += 1
            await context.progress("the model is answering", chunks=chunks)
        if not chunks and not prompt_tokens:
            raise _EmptyStreamError  # not one chunk, not even usage: nothing was answered
        return "".join(parts), prompt_tokens, completion_tokens

    async def _with_retries(
        self,
        client: ChatClient,
        messages: list[dict[str, Any]],
        mode: Mode,
        key: str,
        context: HandlerContext,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, int, int, list[tuple[str, str, str]]]:
        """One request; 429 and 5xx are retried after Retry-After (or a backoff)."""
        request = request_for(
            self.spec, messages, mode, max_tokens=self._max_tokens(messages), tools=tools
        )
        for retry in range(self.spec.max_retries + 1):
            try:
                # A server that trickles bytes must not hold the slot past the timeout.
                return await self._exchange(
                    client, self._complete(client, request, mode, context), self.spec.timeout
                )
            except ModelHttpError as error:
                kind = refusal_kind(error.status_code, error.body)
                if kind == "overflow":
                    raise AttemptEndedError(
                        overflow_outcome(self.spec, self.where, scrub(error.message, key))
                    ) from error
                if kind == "mode":  # a 400, or a 500 that names the mode: refused, not busy
                    raise _ModeRefusedError(error) from error
                if kind != "busy":
                    raise AttemptEndedError(self._refused(error, key)) from error
                if retry == self.spec.max_retries:
                    raise AttemptEndedError(
                        Outcome.failed(
                            f"the model server at {self.where} answered {error.status_code} "
                            f"{retry + 1} time(s): {scrub(error.message, key)}",
                            retryable=True,
                        )
                    ) from error
                # Capped: a Retry-After of an hour must not stop a role for an hour.
                delay = min(
                    retry_after(error.headers) or min(30.0, 2.0**retry),
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
                    await context.limiter.acquire(tokens_of(messages, self.spec.max_tokens))
                else:
                    await asyncio.sleep(delay)
            except (TimeoutError, ModelTimeoutError) as error:
                raise AttemptEndedError(
                    Outcome.failed(
                        f"no answer from the model server at {self.where} within "
                        f"{self.spec.timeout:g}s",
                        retryable=True,
                    )
                ) from error
            except ModelUnreachableError as error:
                raise AttemptEndedError(
                    Outcome.failed(
                        f"cannot reach the model server at {self.where}: {scrub(str(error), key)}",
                        retryable=True,
                    )
                ) from error
        raise AssertionError("unreachable: the last retry raises")

    def _refused(self, error: ModelHttpError, key: str) -> Outcome:
        """A refusal that no retry and no other mode changes."""
        if error.status_code in (401, 403):
            return Outcome.failed(
                f"the model server at {self.where} refused the key "
                f"({error.status_code}): set {self.spec.api_key_env} to a key it "
                f"accepts (the role file's handler.api_key_env names the variable"
                f"{'; it is not set' if not key else ''})",
                retryable=False,
            )
        if error.status_code == 404:
            return Outcome.failed(
                f"the model server at {self.where} does not know model "
                f"{self.spec.llm!r} (404): fix handler.llm in the role file, or "
                "handler.base_url",
                retryable=False,
            )
        return refused_outcome(self.spec, self.where, error, key)
