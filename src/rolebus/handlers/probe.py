"""``rolebus llm check``: what one model server honours, asked once each way.

Each answer mode (a prompted answer, ``json_schema``, ``json_object`` with the schema,
a forced tool call), streaming and whether a stream carries its usage, and the context
window where the server tells (llama.cpp's ``/props``). From what works it says the
role-file settings to use. A few small requests: nothing is recorded or charged to a
role's budget.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from rolebus.errors import ConnectError
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
    parse_answer,
    refusal_kind,
    request_for,
    scrub,
)
from rolebus.team.handler_specs import LlmHandler

__all__ = ["Finding", "Report", "check_server"]

_ASK = [
    {"role": "system", "content": 'Answer with this JSON object only: {"status": "completed"}'},
    {"role": "user", "content": "ping"},
]


@dataclass(frozen=True)
class Finding:
    """One probe: what was asked, whether it works (None: the server does not say)."""

    probe: str
    works: bool | None
    detail: str


@dataclass(frozen=True)
class Report:
    where: str
    model: str
    findings: list[Finding]
    context_window: int | None

    def works(self, probe: str) -> bool:
        return any(f.probe == probe and f.works for f in self.findings)

    @property
    def settings(self) -> dict[str, Any]:
        """The role-file handler settings for this server (None: nothing works)."""
        modes = [mode for mode in MODES if self.works(mode)]
        found: dict[str, Any] = {"mode": modes[0] if modes else None}
        found["stream"] = self.works("stream")
        if self.context_window is not None:
            found["context_window"] = self.context_window
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "model": self.model,
            "findings": [asdict(f) for f in self.findings],
            "settings": self.settings,
        }


async def check_server(spec: LlmHandler, *, key: str) -> Report:
    """Probe the server ``spec`` names; a server that cannot be reached is an error."""
    base_url = spec.base_url or os.environ.get("OPENAI_BASE_URL") or None
    where = base_url or "the OpenAI API"
    findings: list[Finding] = []
    client = ChatClient(base_url, key, spec.timeout)
    try:
        for mode in sorted(MODES, key=lambda mode: mode != "prompt"):  # a plain answer first
            findings.append(await _mode(client, spec, mode, where, key))
        findings += await _stream(client, spec, key)
    finally:
        await client.close()
    window = await _context_window(base_url) if base_url else None
    findings.append(
        Finding(
            "context window",
            None if window is None else True,
            f"{window} tokens" if window else "the server does not say: set handler.context_window",
        )
    )
    return Report(where, spec.llm, findings, window)


async def _mode(client: ChatClient, spec: LlmHandler, mode: Mode, where: str, key: str) -> Finding:
    try:
        response = await client.complete(request_for(spec, _ASK, mode, max_tokens=64))
    except (ModelUnreachableError, ModelTimeoutError) as error:
        why = scrub(str(error), key)
        raise ConnectError(
            f"cannot reach the model server at {where}: {why}",
            hint="start it, or fix handler.base_url (or OPENAI_BASE_URL)",
        ) from error
    except ModelHttpError as error:
        kind = refusal_kind(error.status_code, error.body)
        said = scrub(str(error.message), key)[:160]
        return Finding(mode, False, f"{kind} ({error.status_code}): {said}")
    outcome, problem = parse_answer(answer_text(response, mode))
    return Finding(
        mode,
        True,
        "a valid outcome" if outcome is not None else f"answers, loosely: {problem[:80]}",
    )


async def _stream(client: ChatClient, spec: LlmHandler, key: str) -> list[Finding]:
    usage = False
    try:
        async for chunk in client.stream(request_for(spec, _ASK, "prompt", max_tokens=32)):
            usage = usage or chunk.get("usage") is not None
    except (ModelUnreachableError, ModelTimeoutError) as error:
        said = scrub(str(error), key)[:160]
        return [Finding("stream", False, f"broke off: {said} (set handler.stream = false)")]
    except ModelHttpError as error:
        said = scrub(str(error.message), key)[:160]
        return [
            Finding("stream", False, f"{error.status_code}: {said} (set handler.stream = false)")
        ]
    detail = "a usage chunk at the end" if usage else "no usage: calls are counted as estimated"
    return [Finding("stream", True, "streams"), Finding("stream usage", usage, detail)]


async def _context_window(base_url: str) -> int | None:
    """What llama.cpp's server says its context is (``/props``); None elsewhere."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            answer = await http.get(f"{root}/props")
        settings = answer.json().get("default_generation_settings", {})
        window = settings.get("n_ctx")
        return int(window) if window else None
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return None
