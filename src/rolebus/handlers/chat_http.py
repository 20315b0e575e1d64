"""The chat-completions protocol, and nothing else: one request, answered whole or
streamed, and the server's refusals as :class:`ModelHttpError`.

The official ``openai`` client carries the requests (the key, the base URL, the
connection pool, its error statuses); its typed response objects are skipped: it
builds one for every streamed chunk, which cost more per call than the rest of a
task's bookkeeping, and the bus reads a handful of fields of untrusted JSON anyway.
This is the only module that imports ``openai``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2
import openai

__all__ = ["ChatClient", "ModelHttpError", "ModelTimeoutError", "ModelUnreachableError"]


class ModelHttpError(Exception):
    """The server answered with an error status."""

    def __init__(self, status_code: int, message: str, body: str, headers: Mapping[str, str]):
        super().__init__(message)
        self.status_code = status_code
        self.message = message  # the error body's message, or the body itself
        self.body = body  # the whole body: what classifies a refusal
        self.headers = headers


class ModelUnreachableError(Exception):
    """No HTTP answer: the connection failed or broke off."""


class ModelTimeoutError(Exception):
    """No answer within the client's timeout."""


def _said(body: Any) -> str | None:
    """The message in an error body (``{"error": {"message": ...}}`` and kin)."""
    inner = body.get("error", body) if isinstance(body, dict) else body
    said = inner.get("message") if isinstance(inner, dict) else inner
    return said if isinstance(said, str) and said else None


def _status_error(error: openai.APIStatusError) -> ModelHttpError:
    return ModelHttpError(
        error.status_code,
        _said(error.body) or str(error.message),
        str(error.message),
        error.response.headers,
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError as error:
        raise ModelUnreachableError(f"the answer is not JSON: {text[:200]!r}") from error
    if not isinstance(answer, dict):
        raise ModelUnreachableError(f"the answer is not a JSON object: {text[:200]!r}")
    return answer


class ChatClient:
    """One connection pool to one server, with one key."""

    def __init__(self, base_url: str | None, key: str, timeout: float) -> None:
        self._openai = openai.AsyncOpenAI(
            api_key=key or "unset",  # local servers (Ollama, llama.cpp) need none
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # retries are the caller's: they honour Retry-After and are logged
        )
        self._completions = self._openai.chat.completions

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One answer, whole."""
        try:
            response = await self._completions.with_raw_response.create(**request)
            return _json_object(response.http_response.text)
        except openai.APIStatusError as error:
            raise _status_error(error) from error
        except openai.APITimeoutError as error:
            raise ModelTimeoutError(str(error)) from error
        except openai.APIConnectionError as error:
            raise ModelUnreachableError(str(error.__cause__ or error)) from error

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The answer's chunks, as the server sends them (its ``data:`` lines)."""
        try:
            async with self._completions.with_streaming_response.create(
                **request, stream=True, stream_options={"include_usage": True}
            ) as response:
                async for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue  # a keep-alive or a comment some servers send
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk and "choices" not in chunk:  # streamed after a 200
                        raise ModelHttpError(
                            500, _said(chunk) or data, data, response.http_response.headers
                        )
                    yield chunk
        except openai.APIStatusError as error:
            raise _status_error(error) from error
        except (openai.APITimeoutError, httpx2.TimeoutException) as error:
            raise ModelTimeoutError(str(error)) from error
        except (openai.APIConnectionError, httpx2.TransportError) as error:
            raise ModelUnreachableError(str(getattr(error, "__cause__", None) or error)) from error

    async def close(self) -> None:
        await self._openai.close()
