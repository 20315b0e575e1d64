"""The tools a role's card gives its LLM handler (``[[tools]]`` in a role file)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ToolSource"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolSource(_Strict):
    """Tools an LLM role may call: an MCP server (``mcp``: a stdio command; ``url``: a
    streamable HTTP endpoint) or a Python function (``python = "module:function"``,
    its parameters typed). The role sees only the tools ``allow`` names (a Python
    function: its own name, unless ``allow`` says otherwise)."""

    mcp: list[str] | None = Field(default=None, min_length=1)
    url: str | None = None
    python: str | None = None
    allow: list[str] = Field(default_factory=list)
    #: A tool's boundary tag (``spend``, ``deploy``, ...): a call to it is ruled by the
    #: role's ``never`` rules whose kinds name the tag (approval parks the task).
    boundaries: dict[str, str] = Field(default_factory=dict)
    #: Tools that may run again on a redelivery (reads): the others run once a task.
    idempotent: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _function_allowed(cls, value: Any) -> Any:
        python = value.get("python") if isinstance(value, dict) else None
        if isinstance(python, str) and not value.get("allow"):
            return {**value, "allow": [python.rpartition(":")[2]]}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ToolSource:
        given = [name for name in ("mcp", "url", "python") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                'a tool source is one of mcp = [command...], url = "http..." '
                'or python = "module:function"'
            )
        if self.python is not None:
            module, colon, function = self.python.partition(":")
            if not (module and colon and function):
                raise ValueError(f"python = {self.python!r} is not 'module:function'")
        elif not self.allow:
            raise ValueError("an MCP server's tools need allow = [names]: a role sees only those")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} is not http(s)")
        return self
