"""Commands that put work on the bus: publish a task, publish a file of them, and
the subject catalog that says where each kind of message goes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rolebus.bus import Bus, task_subject_for
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    err,
    out,
    print_json,
    run,
    settings_for,
    team_for,
)
from rolebus.cli.task_lines import parse_task_lines
from rolebus.errors import ConfigError, RolebusError
from rolebus.wire.messages import MAX_DEPTH
from rolebus.wire.subjects import parse_subject

# --- publishing --------------------------------------------------------------------------


def _payload(payload: str | None, payload_file: Path | None) -> dict[str, Any]:
    if payload is not None and payload_file is not None:
        raise ConfigError("give --payload or --payload-file, not both")
    source = "--payload"
    text = payload
    if payload_file is not None:
        source = f"--payload-file {payload_file}"
        text = read_text(payload_file, what=source)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(
            f"{source} nests too deeply to read", hint=f"payloads nest at most {MAX_DEPTH} levels"
        ) from None
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{source} is not JSON: {error.msg} at line {error.lineno} column {error.colno}",
            hint='give a JSON object, e.g. --payload \'{"endpoint": "/orders"}\'',
        ) from error
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source} is a JSON {type(value).__name__}, not an object",
            hint='wrap it in an object, e.g. {"items": [...]}',
        )
    return value


def publish(
    subject: Annotated[
        str, typer.Argument(help="`task.<domain>.<kind>` (or `task.<domain>` with --kind K)")
    ],
    title: Annotated[str, typer.Option("--title", "-t", help="What the task is, in a line.")],
    kind: Annotated[str | None, typer.Option(help="The task kind, if not in SUBJECT.")] = None,
    payload: Annotated[str | None, typer.Option(help="A JSON object with the task's data.")] = None,
    payload_file: Annotated[
        Path | None, typer.Option(help="Read the JSON payload from this file.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Higher is more urgent.")] = None,
    task_id: Annotated[
        str | None, typer.Option("--id", help="Your own task id (publishing it twice is a no-op).")
    ] = None,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a task; prints its id and stream sequence.

    Example: `rolebus publish task.backend.implement -t "Orders API" --payload '{"v": 1}'`
    """
    settings = settings_for(roles)
    team = team_for(settings)
    team.owner_of(parse_subject(task_subject_for(subject, kind)).second)
    data = _payload(payload, payload_file)
    extra: dict[str, Any] = {"priority": priority}
    if task_id is not None:
        extra["id"] = task_id

    async def go() -> tuple[Any, Any]:
        async with await Bus.connect(settings, name="rolebus-publish") as bus:
            return await bus.publish_task(
                subject, title=title, kind=kind, payload=data, team=team, **extra
            )

    task, ack = run(go())
    if as_json:
        print_json(
            {
                "id": task.id,
                "subject": f"task.{subject.split('.')[1]}.{task.kind}",
                "stream": ack.stream,
                "seq": ack.seq,
                "duplicate": ack.duplicate,
            }
        )
        return
    note = " (duplicate: already stored, not added again)" if ack.duplicate else ""
    out.print(f"published task [bold]{task.id}[/] ({ack.stream} seq {ack.seq}){note}")


def publish_file(
    file: Annotated[str, typer.Argument(help="A JSON-lines file of tasks; - for stdin.")],
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish many tasks from a JSON-lines file, one task per line, in atomic batches.

    A line: `{"subject": "task.backend.implement", "title": "Orders API"}`, with
    optional "kind", "payload", "priority" and "id". Every line is checked before
    anything is published; every bad one is named by its number. Each line is stored
    once however often the file is published: its "id" is its Msg-Id, and a line
    without one gets an id derived from its text and line number.

    Example: `rolebus publish-file backlog.jsonl`
    """
    settings = settings_for(roles)
    team = team_for(settings)
    source = "stdin" if file == "-" else file
    if file == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as error:
            raise ConfigError(f"stdin is not UTF-8 text: {error.reason}") from None
    else:
        text = read_text(Path(file), what=file)
    tasks = parse_task_lines(text, source=source, team=team)
    chunk = 5000

    async def go() -> tuple[list[Any], RolebusError | None]:
        acks: list[Any] = []
        async with await Bus.connect(settings, name="rolebus-publish") as bus:
            for start in range(0, len(tasks), chunk):
                try:
                    acks.extend(await bus.publish_many(tasks[start : start + chunk]))
                except RolebusError as error:
                    return acks, error
                if len(tasks) > chunk and not as_json:
                    err.print(f"  {len(acks):,} / {len(tasks):,} published")
        return acks, None

    started = time.monotonic()
    acks, failure = run(go())
    seconds = time.monotonic() - started
    duplicates = sum(1 for ack in acks if ack.duplicate)
    summary: dict[str, Any] = {
        "published": len(acks) - duplicates,
        "duplicates": duplicates,
        "first_seq": min((ack.seq for ack in acks), default=None),
        "last_seq": max((ack.seq for ack in acks), default=None),
        "seconds": round(seconds, 3),
        "ids": [task.id for _, task in tasks[: len(acks)]],
    }
    if failure is not None:
        # Every line has an id (its own, or derived from it): running the same file
        # again stores what is missing and nothing twice.
        summary["error"] = failure.message
        summary["not_confirmed"] = [task.id for _, task in tasks[len(acks) :]]
        if as_json:
            print_json(summary)
        else:
            err.print(
                f"[bold red]error:[/] {failure.message}\n"
                f"  {len(acks):,} of {len(tasks):,} tasks from {source} were stored "
                f"({len(tasks) - len(acks):,} not confirmed)",
                highlight=False,
            )
            if failure.hint:
                err.print(f"  [dim]hint:[/] {failure.hint}", highlight=False)
            err.print(
                "  then run the same command again: what is stored is not added twice",
                highlight=False,
            )
        raise SystemExit(1)
    if as_json:
        print_json(summary)
        return
    note = f" ({duplicates:,} already stored, not added again)" if duplicates else ""
    out.print(
        f"published {summary['published']:,} tasks from {source}{note} in {seconds:.2f}s "
        f"({acks[0].stream} seq {summary['first_seq']}..{summary['last_seq']})"
    )


# --- catalog -----------------------------------------------------------------------------


def read_text(path: Path, *, what: str) -> str:
    """A UTF-8 text file, or a ConfigError saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read {what}: {error.strerror}", hint="check the path, or use - for stdin"
        ) from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} is not UTF-8 text (byte {error.start}: {error.reason})",
            hint="save it as UTF-8 JSON",
        ) from None
