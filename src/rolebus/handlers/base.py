"""Handlers behind one interface: a Python callable, an external command, a builtin.

A handler is ``async def handle(task: Task, context: HandlerContext) -> Outcome``.
The role file's ``handler`` picks the kind:

- ``"python:package.module:function"``: an async (or plain) function.
- ``{ command = ["prog", "arg"], timeout = 60 }``: a program that reads one JSON
  object on stdin and prints one JSON outcome on stdout (the command protocol,
  documented in the README). How a coding agent CLI plugs into a role.
- ``"builtin:NAME"``: the scripted agents in :mod:`rolebus.handlers.scripted`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from rolebus.team.roles import RoleSpec
from rolebus.wire.codec import validation_problems
from rolebus.wire.messages import Decision, Outcome, Task

__all__ = ["Handler", "HandlerContext", "outcome_from_json"]


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
