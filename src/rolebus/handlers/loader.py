"""From a role file's ``handler`` to a handler: the one place the kinds meet.

- ``"python:package.module:function"``: an async (or plain) function;
- ``{ command = ["prog", "arg"], timeout = 60 }``: an external command;
- ``"builtin:NAME"``: a scripted agent (:mod:`~rolebus.handlers.scripted`, and the
  team's own in :mod:`~rolebus.handlers.team`).
"""

from __future__ import annotations

from pathlib import Path

from rolebus.errors import ConfigError
from rolebus.handlers.base import Handler
from rolebus.handlers.command import CommandRunner
from rolebus.handlers.python import PythonHandler, import_callable
from rolebus.handlers.scripted import noop, scripted
from rolebus.handlers.team import TEAM_AGENTS
from rolebus.team.roles import CommandHandler

__all__ = ["BUILTINS", "builtin", "load_handler"]

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
    spec: str | CommandHandler, *, role: str = "", runs_dir: Path | None = None
) -> Handler:
    """The handler a role file names, or a ConfigError that says what is wrong.

    ``runs_dir``: where a command handler records its live runs (a worker passes
    its role's folder in the state folder)."""
    if isinstance(spec, CommandHandler):
        return CommandRunner(spec, runs_dir=runs_dir)
    if spec.startswith("python:"):
        return PythonHandler(import_callable(spec), spec)
    if spec.startswith("builtin:"):
        return builtin(spec.removeprefix("builtin:"), role=role)
    raise ConfigError(f"unknown handler {spec!r}", hint="see the role file docs in the README")
