"""Many tasks from a JSON-lines file, checked whole before any is published.

One task per line: ``{"subject": "task.backend.implement", "title": "..."}`` with
optional ``kind`` (when the subject is ``task.<domain>``), ``payload`` (an object),
``priority`` and ``id`` (publishing the same id again is a no-op). Blank lines and
lines starting with ``#`` are skipped. A bad line is reported with its number, and
nothing is published: half a file is harder to fix than none.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from rolebus.bus import task_subject_for
from rolebus.errors import ConfigError, RolebusError
from rolebus.team.roles import Team
from rolebus.wire.messages import MAX_DEPTH, Task
from rolebus.wire.subjects import parse_subject

__all__ = ["parse_task_lines"]

_FIELDS = {"subject", "title", "kind", "payload", "priority", "id"}
_EXAMPLE = '{"subject": "task.backend.implement", "title": "Orders API"}'
_SHOWN = 20  # bad lines named in the error; the rest are counted


def parse_task_lines(text: str, *, source: str, team: Team | None) -> list[tuple[str, Task]]:
    """``(subject, task)`` for every line, or one ConfigError naming every bad line.

    A line without an ``id`` gets one derived from its text and line number, so
    publishing the same file again (after a partial run, say) names the same tasks:
    the server de-duplicates them, and a task already done is not run again."""
    tasks: list[tuple[str, Task]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"line {number}"
        try:
            tasks.append(_task(json.loads(line), team, derived_id=_line_id(line, number)))
        except RecursionError:
            problems.append(f"{where}: nests too deeply (at most {MAX_DEPTH} levels)")
        except json.JSONDecodeError as error:
            problems.append(f"{where} is not JSON: {error.msg} at column {error.colno}")
        except ValidationError as error:
            problems.append(
                f"{where}: "
                + "; ".join(
                    f"{'.'.join(str(part) for part in item['loc']) or 'task'}: {item['msg']}"
                    for item in error.errors()
                )
            )
        except RolebusError as error:
            problems.append(f"{where}: {error.message}")
    if problems:
        shown = problems[:_SHOWN]
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ConfigError(
            f"{source}: {len(problems)} bad line(s), nothing published: " + "; ".join(shown) + more,
            hint=f"one JSON object per line, e.g. {_EXAMPLE}",
        )
    if not tasks:
        raise ConfigError(f"{source} has no tasks", hint=f"one JSON object per line: {_EXAMPLE}")
    return tasks


def _line_id(line: str, number: int) -> str:
    return hashlib.sha256(f"{number}:{line.strip()}".encode()).hexdigest()[:16]


def _task(entry: Any, team: Team | None, *, derived_id: str) -> tuple[str, Task]:
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
    fields.setdefault("id", derived_id)
    return subject, Task(kind=parsed.third, title=entry["title"], **fields)
