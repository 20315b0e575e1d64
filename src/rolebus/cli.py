"""The ``rolebus`` command. The only place logging is configured.

Every command turns a :class:`~rolebus.errors.RolebusError` into one clear
message on stderr and exit code 1 (2 for bad usage); never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar, cast

import structlog
import typer
from rich.console import Console
from rich.table import Table

from rolebus import codec, dlq
from rolebus import subjects as names
from rolebus.auth import ADMIN, Credentials, render_config
from rolebus.bulk import parse_task_lines
from rolebus.bus import Bus, task_subject_for
from rolebus.config import Settings
from rolebus.dlq import DeadLetter
from rolebus.errors import ConfigError, RolebusError
from rolebus.roles import RoleSpec, Team, load_team
from rolebus.runner import provision_team, start_workers, stop_on_signals
from rolebus.server import DEFAULT_PORT, port_is_free, running_server_url, serve
from rolebus.subjects import parse_subject

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="rolebus",
    help="An event-driven task bus for teams of role agents, on NATS JetStream.\n\n"
    "Start a server with `rolebus server` (or set NATS_URL), publish tasks with "
    "`rolebus publish`, run the team with `rolebus up`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
roles_app = typer.Typer(help="The team: list the roles, or check the role files.")
app.add_typer(roles_app, name="roles")
dlq_app = typer.Typer(
    help="Dead letters: messages a worker gave up on (undecodable, invalid, failed for "
    "good, or out of attempts), with why.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RolesOption = Annotated[
    Path | None,
    typer.Option("--roles", help="Folder of role files (default: roles/ or ROLEBUS_ROLES)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


#: Connection options given before the command (they win over the environment).
_CONNECTION: dict[str, Any] = {}


@app.callback()
def _configure(
    creds: Annotated[
        Path | None, typer.Option("--creds", help="NATS credentials file (or NATS_CREDS).")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="NATS user (or NATS_USER).")] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="File holding the user's password (NATS_PASSWORD)."),
    ] = None,
    nkey: Annotated[
        Path | None, typer.Option("--nkey", help="nkey seed file (or NATS_NKEY).")
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "warning",
    log_format: Annotated[
        str, typer.Option("--log-format", help="console (readable) or json (one object a line).")
    ] = "console",
) -> None:
    configure_logging(level=log_level, fmt=log_format)
    _CONNECTION.clear()
    if password_file is not None:
        try:
            _CONNECTION["password"] = password_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read --password-file {password_file}: {error}") from error
    _CONNECTION.update(creds_file=creds, user=user, nkey_seed_file=nkey)


def configure_logging(*, level: str = "warning", fmt: str = "console") -> None:
    """structlog to stderr: readable by default, JSON lines with ``fmt="json"``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}: use debug, info, warning, error")
    if fmt not in ("console", "json"):
        raise typer.BadParameter(f"unknown log format {fmt!r}: use console or json")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now: loggers are cached on first use and
    must not keep a stream that was replaced (and closed) since."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def settings_for(roles: Path | None = None, **overrides: Any) -> Settings:
    return Settings.from_env(roles_dir=roles, **_CONNECTION, **overrides)


def team_for(settings: Settings) -> Team:
    return load_team(settings.roles_dir)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str)) if sys.stdout.isatty() else print(
        json.dumps(value, default=str)
    )


# --- server ------------------------------------------------------------------------------


@app.command()
def server(
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default 4222 or ROLEBUS_PORT; 0: any).")
    ] = None,
) -> None:
    """Run the embedded NATS server (JetStream, fsync always) until Ctrl-C.

    Its store lives in the state folder (`.rolebus/`, or ROLEBUS_HOME); every other
    command in this folder finds it by itself.
    """
    settings = settings_for(port=port)
    if settings.nats_url:
        err.print(
            f"[yellow]note:[/] NATS_URL={settings.nats_url} is set, so other commands "
            "will use that server, not this one."
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with serve(home=settings.home, port=settings.port, sync_interval=settings.sync_interval) as s:
        run(_provision(settings.with_overrides(nats_url=s.url)))
        out.print(f"rolebus server listening on [bold]{s.url}[/]")
        out.print(
            f"  JetStream store: {s.store_dir}  (sync_interval: {settings.sync_interval})\n"
            f"  log: {s.log_path}\n  Stop with Ctrl-C."
        )
        while not stop.wait(0.5):
            if not s.running:
                raise RolebusError(
                    "nats-server stopped unexpectedly", hint=f"see its log in {s.log_path}"
                )
    out.print("rolebus server stopped.")


async def _provision(settings: Settings) -> None:
    bus = await Bus.connect(settings, name="rolebus-provision")
    await bus.close()


@app.command()
def provision(roles: RolesOption = None) -> None:
    """Create the streams, KV buckets and every role's consumer (idempotent; reports
    incompatible ones). Run it as the admin user when roles use `rolebus auth`."""
    settings = settings_for(roles)
    team = team_for(settings)

    async def go() -> None:
        async with await Bus.connect(settings, name="rolebus-provision") as bus:
            await provision_team(bus, team)

    run(go())
    out.print(
        "ready: streams "
        + ", ".join(s.name for s in names.STREAMS)
        + f"; consumers for {', '.join(role.id for role in team)} and the supervisor"
    )


@app.command("auth")
def auth_command(
    secrets: Annotated[
        Path, typer.Option(help="Folder for the users' password files (created, 0600).")
    ] = Path(".rolebus/secrets"),
    roles: RolesOption = None,
) -> None:
    """Print a nats-server authorization config for the team (least privilege).

    `rolebus auth > nats-auth.conf`, then `include nats-auth.conf` in the server
    config. Workers connect as their role: `rolebus --user eng-be --password-file
    .rolebus/secrets/eng-be.password worker eng-be`.
    """
    team = team_for(settings_for(roles))
    credentials = Credentials.load_or_create(secrets, [ADMIN, *(role.id for role in team)])
    sys.stdout.write(render_config(team, credentials))


# --- publishing --------------------------------------------------------------------------


def _payload(payload: str | None, payload_file: Path | None) -> dict[str, Any]:
    if payload is not None and payload_file is not None:
        raise ConfigError("give --payload or --payload-file, not both")
    source = "--payload"
    text = payload
    if payload_file is not None:
        source = f"--payload-file {payload_file}"
        try:
            text = payload_file.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read {source}: {error}") from error
    if text is None:
        return {}
    try:
        value = json.loads(text)
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


@app.command()
def publish(
    subject: Annotated[
        str, typer.Argument(help="task.<domain>.<kind> (or task.<domain> --kind K)")
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


@app.command("publish-file")
def publish_file(
    file: Annotated[str, typer.Argument(help="A JSON-lines file of tasks; - for stdin.")],
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish many tasks from a JSON-lines file, one task per line, in atomic batches.

    A line: `{"subject": "task.backend.implement", "title": "Orders API"}`, with
    optional "kind", "payload", "priority" and "id". Every line is checked before
    anything is published; a bad one is named by its number. A line with an "id" is
    stored once however often the file is published (the id is its Msg-Id); a line
    without one gets a new id, and a new task, each time.

    Example: `rolebus publish-file backlog.jsonl`
    """
    settings = settings_for(roles)
    team = team_for(settings)
    source = "stdin" if file == "-" else file
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read {file}: {error.strerror}", hint="check the path, or use - for stdin"
        ) from error
    tasks = parse_task_lines(text, source=source, team=team)
    chunk = 5000

    async def go() -> list[Any]:
        acks: list[Any] = []
        async with await Bus.connect(settings, name="rolebus-publish") as bus:
            for start in range(0, len(tasks), chunk):
                acks.extend(await bus.publish_many(tasks[start : start + chunk]))
                if len(tasks) > chunk and not as_json:
                    err.print(f"  {len(acks):,} / {len(tasks):,} published")
        return acks

    started = time.monotonic()
    acks = run(go())
    seconds = time.monotonic() - started
    duplicates = sum(1 for ack in acks if ack.duplicate)
    summary = {
        "published": len(acks) - duplicates,
        "duplicates": duplicates,
        "first_seq": min(ack.seq for ack in acks),
        "last_seq": max(ack.seq for ack in acks),
        "seconds": round(seconds, 3),
        "ids": [task.id for _, task in tasks],
    }
    if as_json:
        print_json(summary)
        return
    note = f" ({duplicates:,} already stored, not added again)" if duplicates else ""
    out.print(
        f"published {summary['published']:,} tasks from {source}{note} in {seconds:.2f}s "
        f"({acks[0].stream} seq {summary['first_seq']}..{summary['last_seq']})"
    )


# --- catalog -----------------------------------------------------------------------------


def subject_catalog(team: Team | None) -> list[dict[str, str]]:
    """Every subject family with its stream, message type and who reads it."""

    def owner(domain: str) -> str:
        return team.domain_owner.get(domain, "?") if team else ""

    rows = [
        {
            "subject": "task.<domain>.<kind>",
            "stream": names.WORK_STREAM,
            "message": "Task",
            "read_by": "the role owning <domain>",
        },
        {
            "subject": "handoff.<to_role>.<contract>",
            "stream": names.WORK_STREAM,
            "message": "Handoff",
            "read_by": "<to_role>",
        },
        {
            "subject": "escalation.<to_role>.<reason>",
            "stream": names.WORK_STREAM,
            "message": "Escalation",
            "read_by": "<to_role>",
        },
        {
            "subject": "decision.<to_role>.<escalation_id>",
            "stream": names.WORK_STREAM,
            "message": "Decision",
            "read_by": "<to_role>",
        },
        {
            "subject": "event.<entity>.<state>",
            "stream": names.EVENTS_STREAM,
            "message": "Event",
            "read_by": "history, replay, projections",
        },
        {
            "subject": "dlq.<original subject>",
            "stream": names.DLQ_STREAM,
            "message": "the original message",
            "read_by": "`rolebus dlq`",
        },
    ]
    if team is not None:
        for domain in sorted(team.domain_owner):
            rows.append(
                {
                    "subject": f"task.{domain}.>",
                    "stream": names.WORK_STREAM,
                    "message": "Task",
                    "read_by": owner(domain),
                }
            )
    return rows


@app.command("subjects")
def subjects_command(roles: RolesOption = None, as_json: JsonOption = False) -> None:
    """Print the subject catalog (with the team's domains when roles/ is found).

    subjects.md documents each subject's fields for publishers in other languages.
    """
    settings = settings_for(roles)
    team: Team | None = None
    if settings.roles_dir.is_dir():
        team = team_for(settings)
    rows = subject_catalog(team)
    if as_json:
        print_json(rows)
        return
    table = Table("subject", "stream", "message", "read by", title="rolebus subjects")
    for row in rows:
        table.add_row(row["subject"], row["stream"], row["message"], row["read_by"])
    out.print(table)


def _role_row(role: Any) -> dict[str, Any]:
    handler = role.handler if isinstance(role.handler, str) else " ".join(role.handler.command)
    return {
        "id": role.id,
        "title": role.title,
        "reports_to": role.reports_to,
        "domains": role.domains,
        "handler": handler,
        "concurrency": role.concurrency,
        "never": [rule.what for rule in role.never],
        "file": role.source,
    }


@roles_app.callback(invoke_without_command=True)
def roles_list(ctx: typer.Context, roles: RolesOption = None, as_json: JsonOption = False) -> None:
    """List the team (id, title, who they report to, domains, handler)."""
    if ctx.invoked_subcommand is not None:
        return
    team = team_for(settings_for(roles))
    rows = [_role_row(role) for role in team]
    if as_json:
        print_json(rows)
        return
    table = Table("id", "title", "reports to", "domains", "handler", "never", title="the team")
    for row in rows:
        table.add_row(
            row["id"],
            row["title"],
            row["reports_to"] or "(top)",
            ", ".join(row["domains"]),
            row["handler"],
            "\n".join(row["never"]),
        )
    out.print(table)


@roles_app.command("check")
def roles_check(roles: RolesOption = None) -> None:
    """Validate every role file and the team as a whole; exit 1 naming the problem."""
    settings = settings_for(roles)
    team = team_for(settings)
    out.print(
        f"{len(team)} roles OK in {settings.roles_dir}: " + ", ".join(role.id for role in team)
    )


# --- workers -----------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_server_if_needed(settings: Settings) -> Iterator[Settings]:
    """With no NATS_URL and no running `rolebus server`, run the embedded one."""
    if settings.nats_url or running_server_url(settings.home):
        yield settings
        return
    port = settings.port
    if port == DEFAULT_PORT and not port_is_free("127.0.0.1", port):
        # Another server (another project's?) has the default port: any free one
        # will do for a server that lives as long as this command.
        out.print(f"[dim]port {port} is taken; the embedded server takes a free one[/]")
        port = 0
    with serve(home=settings.home, port=port, sync_interval=settings.sync_interval) as s:
        out.print(f"embedded nats-server on [bold]{s.url}[/] (store {s.store_dir})")
        yield settings.with_overrides(nats_url=s.url)


async def _run_until_stopped(
    settings: Settings, team: Team, roles: list[RoleSpec], *, replicas: int, grace: float
) -> None:
    stop = asyncio.Event()
    restore = stop_on_signals(stop)
    try:
        crew = await start_workers(settings, team, roles, replicas=replicas, grace=grace)
        table = Table(
            "role", "title", "consumer", "concurrency", "replicas", "reads", title="roles up"
        )
        for role in roles:
            table.add_row(
                role.id,
                role.title,
                names.consumer_name(role.id),
                str(role.concurrency),
                str(replicas),
                ", ".join(role.filter_subjects),
            )
        out.print(table)
        out.print(
            "Stop with Ctrl-C (running handlers get "
            f"{grace:g}s to finish, the rest is redelivered)."
        )
        # Everything loaded so far (modules, pydantic schemas, the team) lives as
        # long as the process: keep it out of the collector's full passes, which
        # otherwise stop a busy worker ~20 ms each (p99 at 1,000 tasks/s: 40 -> 15 ms).
        gc.freeze()
        await stop.wait()
        out.print("stopping...")
        await crew.stop()
    finally:
        await restore()
    out.print("stopped.")


GraceOption = Annotated[
    float, typer.Option(help="Seconds running handlers get to finish on Ctrl-C/SIGTERM.")
]


@app.command()
def worker(
    role: Annotated[str, typer.Argument(help="The role id, e.g. eng-be.")],
    replicas: Annotated[int, typer.Option(min=1, help="Workers in this process.")] = 1,
    grace: GraceOption = 30.0,
    roles: RolesOption = None,
) -> None:
    """Run one role's worker until Ctrl-C/SIGTERM.

    Several `rolebus worker ROLE` processes (or --replicas) share the role's durable
    consumer: the work is split and nothing is handled twice.
    """
    settings = settings_for(roles)
    team = team_for(settings)
    spec = team.role(role)
    run(_run_until_stopped(settings, team, [spec], replicas=replicas, grace=grace))


@app.command()
def up(
    grace: GraceOption = 30.0,
    roles: RolesOption = None,
) -> None:
    """Run the whole team (every role in roles/) until Ctrl-C.

    Without NATS_URL and without a running `rolebus server`, starts the embedded
    server too.
    """
    settings = settings_for(roles)
    team = team_for(settings)
    with embedded_server_if_needed(settings) as live:
        run(_run_until_stopped(live, team, list(team), replicas=1, grace=grace))


# --- dead letters --------------------------------------------------------------------------


async def _dead_letters(settings: Settings) -> list[DeadLetter]:
    async with await Bus.connect(settings, name="rolebus-dlq") as bus:
        return [entry async for entry in dlq.list_dead_letters(bus.connection)]


@dlq_app.command("list")
def dlq_list(as_json: JsonOption = False) -> None:
    """List dead letters: sequence, subject, reason, attempts, error."""
    entries = run(_dead_letters(settings_for()))
    if as_json:
        print_json([entry.as_json() for entry in entries])
        return
    if not entries:
        out.print("no dead letters.")
        return
    table = Table(
        "seq", "subject", "task", "reason", "role", "attempts", "error", title="dead letters"
    )
    for entry in entries:
        table.add_row(
            str(entry.seq),
            entry.subject,
            entry.task_id or "-",
            entry.reason,
            entry.role,
            str(entry.attempts),
            entry.error[:80],
        )
    out.print(table)


@dlq_app.command("show")
def dlq_show(
    key: Annotated[str, typer.Argument(help="DLQ sequence number or task id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter with its headers and decoded message."""

    async def go() -> tuple[DeadLetter, Any]:
        async with await Bus.connect(settings_for(), name="rolebus-dlq") as bus:
            entry = await dlq.find(bus.connection, key)
        try:
            body: Any = codec.decode(entry.subject, entry.message.data).model_dump(mode="json")
        except RolebusError as error:
            body = {"undecodable": error.message, "bytes": entry.message.data[:200].hex()}
        return entry, body

    entry, body = run(go())
    document = {**entry.as_json(), "headers": dict(entry.message.headers), "message": body}
    if as_json:
        print_json(document)
        return
    for key_name, value in document.items():
        out.print(f"[bold]{key_name}[/]: {value}", highlight=False)


@dlq_app.command("redrive")
def dlq_redrive(
    key: Annotated[str | None, typer.Argument(help="DLQ sequence number or task id.")] = None,
    redrive_all: Annotated[bool, typer.Option("--all", help="Redrive every dead letter.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Put dead letters back on their original subject (the worker runs them again)."""
    if (key is None) == (not redrive_all):
        raise ConfigError("give one dead letter (its sequence or task id) or --all, not both")

    async def go() -> list[dict[str, Any]]:
        async with await Bus.connect(settings_for(), name="rolebus-dlq") as bus:
            if redrive_all:
                entries = [entry async for entry in dlq.list_dead_letters(bus.connection)]
            else:
                assert key is not None
                entries = [await dlq.find(bus.connection, key)]
            done = []
            for entry in entries:
                ack = await dlq.redrive(bus.connection, entry)
                done.append(
                    {
                        "dlq_seq": entry.seq,
                        "subject": entry.subject,
                        "task_id": entry.task_id,
                        "seq": ack.seq,
                    }
                )
            return done

    done = run(go())
    if as_json:
        print_json(done)
        return
    for item in done:
        out.print(
            f"redriven {item['task_id'] or 'message'} to {item['subject']} (seq {item['seq']})"
        )
    if not done:
        out.print("no dead letters.")


# --- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning rolebus errors into clean exits."""
    # Command groups in their own modules register themselves on `app`.
    from rolebus import cli_flow, cli_history  # noqa: F401

    _run_app(app, argv)


def _run_app(application: Callable[..., Any], argv: list[str] | None) -> None:
    try:
        application(args=argv, standalone_mode=True)
    except RolebusError as error:
        err.print(f"[bold red]error:[/] {error.message}", highlight=False)
        if error.hint:
            err.print(f"  [dim]hint:[/] {error.hint}", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
