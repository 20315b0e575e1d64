"""Many tasks from a JSON-lines file, checked whole before any is published.

One task per line: ``{"subject": "task.backend.implement", "title": "..."}`` with
optional ``kind`` (when the subject is ``task.<domain>``), ``payload`` (an object),
``priority`` and ``id`` (publishing the same id again is a no-op). Blank lines and
lines starting with ``#`` are skipped. A bad line is reported with its number, and
nothing is published: half a file is harder to fix than none.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from rolebus.bus import task_subject_for
from rolebus.errors import ConfigError, RolebusError
from rolebus.team.roles import Team
from rolebus.wire.messages import Task
from rolebus.wire.subjects import parse_subject

__all__ = ["parse_task_lines"]

_FIELDS = {"subject", "title", "kind", "payload", "priority", "id"}
_EXAMPLE = '{"subject": "task.backend.implement", "title": "Orders API"}'


def parse_task_lines(text: str, *, source: str, team: Team | None) -> list[tuple[str, Task]]:
    """``(subject, task)`` for every line; a ConfigError naming the first bad line."""
    tasks: list[tuple[str, Task]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source} line {number}"
        try:
            tasks.append(_task(json.loads(line), team))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{where} is not JSON: {error.msg} at column {error.colno}",
                hint=f"one JSON object per line, e.g. {_EXAMPLE}",
            ) from error
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc']) or 'task'}: {item['msg']}"
                for item in error.errors()
            )
            raise ConfigError(f"{where}: {problems}", hint=f"e.g. {_EXAMPLE}") from error
        except RolebusError as error:
            raise ConfigError(f"{where}: {error.message}", hint=error.hint) from error
    if not tasks:
        raise ConfigError(f"{source} has no tasks", hint=f"one JSON object per line: {_EXAMPLE}")
    return tasks


def _task(entry: Any, team: Team | None) -> tuple[str, Task]:
    if not isinstance(entry, dict):
        raise ConfigError(f"a JSON {type(entry).__name__}, not an object", hint=f"e.g. {_EXAMPLE}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown field {', '.join(map(repr, unknown))}",
            hint=f"a line may have {', '.join(sorted(_FIELDS))}",
        )
    for required in ("subject", "title"):
        if not isinstance(entry.get(required), str):
            raise ConfigError(f"needs a {required!r} string", hint=f"e.g. {_EXAMPLE}")
    subject = task_subject_for(entry["subject"], entry.get("kind"))
    parsed = parse_subject(subject)
    if team is not None:
        team.owner_of(parsed.second)
    fields = {key: entry[key] for key in ("payload", "priority", "id") if key in entry}
    return subject, Task(kind=parsed.third, title=entry["title"], **fields)
