"""The tools an LLM role may call: MCP servers (the official ``mcp`` SDK) and Python
functions, seen through the role's allow lists.

A tool's definition is what the model is shown (an OpenAI function: name,
description, JSON schema of its arguments); a call gives back text. Whether a call
may run (allow list, boundary tags), and that it runs once, is the LLM handler's
business (handlers/llm.py): this module only knows how to reach a tool.

An MCP server is started for each use (its definitions once per worker, then each
call): a stdio server is a process of its own, which a worker's cancel or crash takes
down with the call, and no session outlives the task that needed it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import tempfile
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError, create_model

from rolebus.errors import RolebusError
from rolebus.team.roles import RoleSpec
from rolebus.team.tool_specs import ToolSource

__all__ = ["ToolCall", "ToolError", "Toolbox"]

#: The most of a tool's result the model is shown (the rest is cut, and says so).
RESULT_LIMIT = 16_000


class ToolError(RolebusError):
    """A tool that cannot be reached or loaded (a role-file problem)."""


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: its id (to answer it), the tool and the arguments
    as the model wrote them (JSON text, untrusted)."""

    id: str
    name: str
    arguments: str

    def as_message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _function(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ToolError(
            f"tool python = {path!r} cannot be loaded: {error}",
            hint="name an importable module and a function in it (module:function)",
        ) from error
    if not callable(found):
        raise ToolError(f"tool python = {path!r} is not a function")
    return found  # type: ignore[no-any-return]


def _arguments_model(function: Callable[..., Any]) -> Any:
    """A pydantic model of the function's parameters (their annotations)."""
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        annotation = parameter.annotation if parameter.annotation is not parameter.empty else Any
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (annotation, default)
    return create_model(f"{function.__name__}_arguments", **fields)


class Toolbox:
    """One role's tools."""

    def __init__(self, role: RoleSpec) -> None:
        self.role = role
        self._sources: dict[str, ToolSource] = {}  # tool name -> its source
        for source in role.tools:
            for name in source.allow:
                self._sources[name] = source
        self._definitions: list[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    def __bool__(self) -> bool:
        return bool(self._sources)

    def allowed(self, name: str) -> bool:
        return name in self._sources

    def boundary(self, name: str) -> str | None:
        source = self._sources.get(name)
        return None if source is None else source.boundaries.get(name)

    def idempotent(self, name: str) -> bool:
        source = self._sources.get(name)
        return source is not None and name in source.idempotent

    @property
    def names(self) -> list[str]:
        return sorted(self._sources)

    async def definitions(self) -> list[dict[str, Any]]:
        """The allowed tools as OpenAI functions (asked of each MCP server once)."""
        async with self._lock:
            if self._definitions is None:
                found: list[dict[str, Any]] = []
                for source in self.role.tools:
                    found += await self._defined_by(source)
                self._definitions = found
            return self._definitions

    async def _defined_by(self, source: ToolSource) -> list[dict[str, Any]]:
        if source.python is not None:
            function = _function(source.python)
            schema = _arguments_model(function).model_json_schema()
            schema.pop("title", None)
            return [
                _definition(name, inspect.getdoc(function) or "", schema) for name in source.allow
            ]
        listed = await self._mcp(source, lambda session: session.list_tools())
        definitions = [
            _definition(tool.name, tool.description or "", tool.input_schema)
            for tool in listed.tools
            if tool.name in source.allow
        ]
        missing = set(source.allow) - {d["function"]["name"] for d in definitions}
        if missing:
            raise ToolError(
                f"the MCP server {_where(source)} has no tool {', '.join(sorted(missing))}",
                hint="fix the role file's tools allow list",
            )
        return definitions

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Run an allowed tool: its result as text, and whether it failed."""
        source = self._sources[name]
        if source.python is not None:
            return await self._python(source.python, arguments)
        result = await self._mcp(source, lambda session: session.call_tool(name, arguments))
        parts = [
            getattr(part, "text", None) or json.dumps(part.model_dump(mode="json"))
            for part in result.content
        ]
        return _bounded("\n".join(parts)), bool(result.is_error)

    async def _python(self, path: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        function = _function(path)
        try:
            checked = _arguments_model(function).model_validate(arguments)
        except ValidationError as error:
            return f"invalid arguments: {error.errors(include_url=False)}", True
        values = {name: getattr(checked, name) for name in type(checked).model_fields}
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(**values)
            else:
                result = await asyncio.to_thread(function, **values)
        except Exception as error:  # a tool's failure is the model's to read
            return f"{type(error).__name__}: {error}", True
        text = result if isinstance(result, str) else json.dumps(result, default=str)
        return _bounded(text), False

    async def _mcp(self, source: ToolSource, use: Callable[[Any], Any]) -> Any:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        log_to: list[str] = []  # what the server wrote on stderr

        try:
            async with AsyncExitStack() as stack:
                if source.mcp is not None:
                    command, *arguments = source.mcp
                    # The server's stderr goes to a file: the worker's own stderr may be
                    # no file at all, and what the server says is the error's detail.
                    errors = stack.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115
                    stack.callback(lambda: _said(errors, log_to))
                    streams = await stack.enter_async_context(
                        stdio_client(
                            StdioServerParameters(command=command, args=arguments), errlog=errors
                        )
                    )
                else:
                    from mcp.client.streamable_http import streamable_http_client

                    streams = await stack.enter_async_context(
                        streamable_http_client(str(source.url))
                    )
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                return await use(session)
        except (OSError, RuntimeError) as error:
            said = f" (it said: {log_to[0][-300:]})" if log_to and log_to[0].strip() else ""
            raise ToolError(
                f"cannot reach the MCP server {_where(source)}: {error}{said}",
                hint="check the role file's tools: the command or URL",
            ) from error


def _said(errors: Any, into: list[str]) -> None:
    errors.seek(0)
    into.append(errors.read())


def _where(source: ToolSource) -> str:
    return " ".join(source.mcp) if source.mcp is not None else str(source.url)


def _definition(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": description[:1000], "parameters": schema},
    }


def _bounded(text: str) -> str:
    if len(text) <= RESULT_LIMIT:
        return text
    return text[:RESULT_LIMIT] + f"\n[... {len(text) - RESULT_LIMIT} more characters cut]"
