"""From a role file's ``handler`` to a handler: the one place the kinds meet.

- ``"python:package.module:function"``: an async (or plain) function;
- ``{ command = ["prog", "arg"], timeout = 60 }``: an external command;
- ``{ llm = "MODEL", base_url = "...", ... }``: a model behind an OpenAI-compatible API;
- ``"builtin:NAME"``: a scripted agent (:mod:`~rolebus.handlers.scripted`, and the
  team's own in :mod:`~rolebus.handlers.team`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rolebus.errors import ConfigError, RoleError
from rolebus.handlers.base import Handler
from rolebus.handlers.command import CommandRunner
from rolebus.handlers.llm import LlmRunner
from rolebus.handlers.python import PythonHandler, import_callable
from rolebus.handlers.scripted import noop, scripted
from rolebus.handlers.team import TEAM_AGENTS
from rolebus.team.handler_specs import CommandHandler, LlmHandler
from rolebus.team.roles import Team

__all__ = ["BUILTINS", "builtin", "check_team_handlers", "load_handler"]

#: Every ``builtin:NAME`` handler.
BUILTINS: dict[str, Handler] = {"noop": noop, "scripted": scripted, "echo": scripted, **TEAM_AGENTS}


def builtin(name: str, *, role: str = "") -> Handler:
    """The builtin handler called ``name``."""
    handler = BUILTINS.get(name)
    if handler is None:
        raise ConfigError(
            f"no builtin handler {name!r}" + (f" (role {role})" if role else ""),
            hint=f"builtins: {', '.join(sorted(BUILTINS))}",
        )
    return handler


def load_handler(
    spec: str | CommandHandler | LlmHandler, *, role: str = "", runs_dir: Path | None = None
) -> Handler:
    """The handler a role file names, or a ConfigError that says what is wrong.

    ``runs_dir``: where a command handler records its live runs (a worker passes
    its role's folder in the state folder)."""
    if isinstance(spec, CommandHandler):
        _check_program(spec.command[0], role=role)
        return CommandRunner(spec, runs_dir=runs_dir)
    if isinstance(spec, LlmHandler):
        return LlmRunner(spec)
    if spec.startswith("python:"):
        return PythonHandler(import_callable(spec), spec)
    if spec.startswith("builtin:"):
        return builtin(spec.removeprefix("builtin:"), role=role)
    raise ConfigError(f"unknown handler {spec!r}", hint="see the role file docs in the README")


def _check_program(program: str, *, role: str) -> None:
    """A command whose program is missing would dead-letter every task: say so now."""
    found = shutil.which(program) if os.sep not in program else program
    if found is None or not os.access(found, os.X_OK) or not os.path.isfile(found):
        raise ConfigError(
            f"handler command {program!r} not found"
            + (f" (role {role})" if role else "")
            + (" or not executable" if found is not None else " on PATH"),
            hint="install it, or name it by its full path in the role file's "
            "handler = { command = [...] }",
        )


def check_team_handlers(team: Team) -> None:
    """Load every role's handler once (a builtin that does not exist, a Python
    module that does not import, a missing program), naming the role's file."""
    for role in team:
        try:
            load_handler(role.handler, role=role.id)
        except ConfigError as error:
            raise RoleError(
                error.message, file=role.source, field="handler", hint=error.hint
            ) from error
