"""What runs a role (the ``handler`` of its role file): a builtin or Python callable
by name, an external command, or a model behind an OpenAI-compatible server."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from rolebus.team.durations import Duration

__all__ = ["CommandHandler", "HandlerSpec", "LlmHandler", "ModelPrices"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandHandler(_Strict):
    """An external program: task JSON on stdin, outcome JSON on stdout."""

    command: list[str] = Field(min_length=1)
    timeout: Duration = 300.0


class ModelPrices(_Strict):
    """What a model costs, in US dollars per million tokens (overrides the price table)."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class LlmHandler(_Strict):
    """A model behind any OpenAI-compatible API: ``handler = { llm = "MODEL", ... }``.

    The key is read from the environment variable ``api_key_env`` when a call is
    made, and never stored, logged or shown."""

    llm: str = Field(min_length=1)
    base_url: str | None = None  # default: OPENAI_BASE_URL, then the API's own
    api_key_env: str = Field(default="OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int = Field(default=2000, ge=1, le=1_000_000)
    timeout: Duration = 120.0
    #: Extra turns that feed a validation error back to the model.
    max_repairs: int = Field(default=2, ge=0, le=10)
    #: Rounds of tool calls one attempt may make (the role's ``tools``).
    max_tool_steps: int = Field(default=8, ge=1, le=100)
    #: Retries of a call the server refused for now (429, 5xx), honouring Retry-After.
    max_retries: int = Field(default=3, ge=0, le=20)
    #: The longest a server's Retry-After may pause this model's callers.
    max_retry_after: Duration = 60.0
    prices: ModelPrices | None = None
    #: Stream the answer (shown as the task's progress) when the server allows it.
    stream: bool = True
    #: Requests and tokens a minute for this model, shared by every worker that calls it.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    #: How the answer is asked for: ``auto`` tries json_schema, json_object (with the
    #: schema), a forced tool call, then a prompted answer, and keeps the first the
    #: server honours; any other value asks only that way.
    mode: Literal["auto", "json_schema", "json_object", "tool", "prompt"] = "auto"
    #: The model's context window in tokens (None: unknown): a request that would not
    #: fit gets a smaller max_tokens, or fails retryable naming this setting.
    context_window: int | None = Field(default=None, ge=256, le=10_000_000)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL, e.g. http://localhost:11434/v1")
        return value


def _handler_kind(value: object) -> str:
    if isinstance(value, str):
        return "named"
    if isinstance(value, LlmHandler) or (isinstance(value, dict) and "llm" in value):
        return "llm"
    return "command"


#: A role's ``handler``: a name (``builtin:``/``python:``), a command table or an llm
#: table, told apart by shape so that an error names the right fields.
HandlerSpec = Annotated[
    Annotated[str, Tag("named")]
    | Annotated[CommandHandler, Tag("command")]
    | Annotated[LlmHandler, Tag("llm")],
    Discriminator(_handler_kind),
]
