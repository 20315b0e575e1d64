"""Handlers behind one interface: a Python callable, an external command, a builtin.

A handler is ``async def handle(task: Task, context: HandlerContext) -> Outcome``.
The role file's ``handler`` picks the kind:

- ``"python:package.module:function"``: an async (or plain) function.
- ``{ command = ["prog", "arg"], timeout = 60 }``: a program that reads one JSON
  object on stdin and prints one JSON outcome on stdout (the command protocol,
  documented in the README). How a coding agent CLI plugs into a role.
- ``"builtin:NAME"``: the scripted agents in :mod:`rolebus.agents`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from rolebus.codec import validation_problems
from rolebus.errors import ConfigError
from rolebus.messages import Decision, Outcome, Task
from rolebus.roles import CommandHandler, RoleSpec

__all__ = [
    "CommandRunner",
    "Handler",
    "HandlerContext",
    "load_handler",
    "outcome_from_json",
]

_STDERR_LIMIT = 4096


@dataclass(frozen=True)
class HandlerContext:
    """What a handler knows besides the task."""

    role: RoleSpec
    subject: str
    attempt: int
    decisions: list[Decision] = field(default_factory=list)
    contracts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "attempt": self.attempt,
            "decisions": [decision.model_dump(mode="json") for decision in self.decisions],
            "contracts": self.contracts,
            **self.extra,
        }


class Handler(Protocol):
    async def __call__(self, task: Task, context: HandlerContext) -> Outcome: ...


def outcome_from_json(value: Any, *, source: str) -> Outcome:
    """Validate a handler's JSON answer, or a non-retryable failure saying what is wrong."""
    if not isinstance(value, dict):
        return Outcome.failed(
            f"{source} returned a JSON {type(value).__name__}, not an object with 'status'",
            retryable=False,
        )
    try:
        return Outcome.model_validate(value)
    except ValidationError as error:
        problems = validation_problems(error)
        return Outcome.failed(f"{source} returned an invalid outcome: {problems}", retryable=False)


class CommandRunner:
    """Runs an external command per task: JSON on stdin, JSON outcome on stdout."""

    def __init__(self, spec: CommandHandler) -> None:
        self.spec = spec
        self.name = " ".join(spec.command)

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        request = {
            "task": task.model_dump(mode="json"),
            "role": {
                "id": context.role.id,
                "title": context.role.title,
                "persona": context.role.persona,
            },
            "context": context.as_json(),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                *self.spec.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            return Outcome.failed(f"cannot start {self.name!r}: {error}", retryable=False)
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(json.dumps(request).encode()), timeout=self.spec.timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await process.wait()
            return Outcome.failed(
                f"{self.name!r} timed out after {self.spec.timeout:g}s and was killed",
                retryable=True,
            )
        tail = stderr[-_STDERR_LIMIT:].decode(errors="replace").strip()
        if process.returncode != 0:
            return Outcome.failed(
                f"{self.name!r} exited with code {process.returncode}"
                + (f"; stderr: {tail}" if tail else ""),
                retryable=True,
            )
        try:
            answer = json.loads(stdout)
        except (json.JSONDecodeError, UnicodeDecodeError):
            shown = stdout[:200].decode(errors="replace")
            return Outcome.failed(
                f"{self.name!r} printed something that is not JSON: {shown!r}"
                + (f"; stderr: {tail}" if tail else ""),
                retryable=False,
            )
        return outcome_from_json(answer, source=repr(self.name))


def _import_callable(spec: str) -> Callable[..., Any]:
    _, module_name, function_name = spec.split(":")
    # Like uvicorn and celery: handler modules are found from where you run.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"handler {spec!r}: cannot import {module_name!r}: {error}",
            hint="check the module path, and run from the folder it is importable from",
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"handler {spec!r}: {module_name} has no function {function_name!r}",
            hint="name an async function (task, context) -> Outcome",
        )
    return function  # type: ignore[no-any-return]


class PythonHandler:
    """Calls ``function(task, context)``; awaits it when it is async."""

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.function = function
        self.name = name

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        answer = self.function(task, context)
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, Outcome):
            return answer
        return outcome_from_json(answer, source=self.name)


def load_handler(spec: str | CommandHandler, *, role: str = "") -> Handler:
    """The handler a role file names, or a ConfigError that says what is wrong."""
    if isinstance(spec, CommandHandler):
        return CommandRunner(spec)
    if spec.startswith("python:"):
        return PythonHandler(_import_callable(spec), spec)
    if spec.startswith("builtin:"):
        from rolebus.agents import builtin

        return builtin(spec.removeprefix("builtin:"), role=role)
    raise ConfigError(f"unknown handler {spec!r}", hint="see the role file docs in the README")
