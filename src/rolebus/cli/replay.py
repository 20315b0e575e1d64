"""`rolebus replay`: the history, as JSON lines or a timeline, live or not."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rolebus.bus import Bus
from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    err,
    out,
    run,
    settings_for,
    team_for,
)
from rolebus.errors import ConfigError
from rolebus.history.replay import (
    Replayed,
    ReplayFilter,
    parse_since,
    replay,
    stream_named,
)
from rolebus.wire.messages import Event
from rolebus.wire.subjects import EVENTS_STREAM, sender_of, stream_holding


def _timeline_line(item: Replayed) -> str:
    stored, message = item.stored, item.message
    when = stored.time.strftime("%H:%M:%S.%f")[:-3]
    prefix = f"[dim]{when} #{stored.seq:<5}[/]"
    if message is None:
        return f"{prefix} [red]undecodable[/] {stored.subject}: {item.error}"
    if isinstance(message, Event):
        what = f"{message.entity}.{message.state}"
        title = message.detail.get("title") or message.detail.get("question") or ""
        extra = message.error or ""
        if message.entity == "handoff":
            title = (
                f"{message.detail.get('contract')} {message.detail.get('version')} -> "
                f"{message.detail.get('to')}"
            )
        if message.entity == "escalation" and message.state == "decided":
            extra = f"{message.detail.get('decided_by')}: {message.detail.get('decision')}"
        attempt = f" (attempt {message.attempt})" if message.attempt > 1 else ""
        return (
            f"{prefix} {message.role or '-':>9}  {what:<22} {message.task_id}{attempt}  "
            f"{title} {extra}".rstrip()
        )
    sender = sender_of(stored.subject) or "person"
    title = (
        getattr(message, "title", None)
        or getattr(message, "question", None)
        or getattr(message, "decision", None)
        or getattr(message, "contract", "")
    )
    return f"{prefix} {sender:>9}  {stored.subject:<40} {message.id}  {title}"


def replay_command(
    stream: Annotated[
        str | None,
        typer.Option(
            help="events, work, dlq or timers (default: the one that stores --subject, "
            "else events)."
        ),
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option(
            help="Subject pattern, e.g. 'event.task.*'. 'task.backend.*' also matches what a "
            "role sent (task.backend.<kind>.<sender>)."
        ),
    ] = None,
    role: Annotated[str | None, typer.Option(help="Only what concerns this role.")] = None,
    correlation: Annotated[str | None, typer.Option(help="One flow (its root task id).")] = None,
    since: Annotated[
        str | None, typer.Option(help="A time (RFC 3339) or a duration ago (10m).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="A time, or a duration ago.")] = None,
    from_seq: Annotated[int | None, typer.Option(min=1, help="Start at this sequence.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read a stream back in order, without disturbing any worker.

    The default is a readable timeline; `--json` prints one object per line
    (stream, seq, subject, time, headers, message). Gaps in sequences are reported.
    """
    settings = settings_for(roles)
    team = team_for(settings) if settings.roles_dir.is_dir() else None
    if role is not None and team is not None and role not in team.roles:
        raise ConfigError(
            f"--role {role!r} is not a role of the team",
            hint=f"roles: {', '.join(sorted(team.roles))} (`rolebus roles` lists them)",
        )
    wanted = ReplayFilter(
        stream=_stream_for(stream, subject),
        subject=subject,
        role=role,
        correlation=correlation,
        since=parse_since(since) if since else None,
        until=parse_since(until, option="--until") if until else None,
        from_seq=from_seq,
        follow=follow,
    )

    async def go() -> int:
        count = 0
        async with await Bus.connect(settings, name="rolebus-replay", provision=False) as bus:
            async for item in replay(bus.connection, wanted, team=team):
                count += 1
                if as_json:
                    sys.stdout.write(item.as_json_line() + "\n")
                    continue
                if item.gap_before:
                    out.print(
                        f"[red]-- gap: {item.gap_before} message(s) missing before "
                        f"seq {item.stored.seq} (expired or deleted) --[/]"
                    )
                out.print(_timeline_line(item), highlight=False)
        return count

    try:
        count = run(go())
    except KeyboardInterrupt:
        return
    if not as_json:
        out.print(f"[dim]{count} message(s) from {wanted.stream}[/]")
    if count == 0 and correlation is not None:
        err.print(
            f"[dim]hint:[/] no message of flow {correlation!r} in {wanted.stream}; a flow is "
            "named by its root task's id (`rolebus tasks` lists them)",
            highlight=False,
        )


def _stream_for(stream: str | None, subject: str | None) -> str:
    """The stream to read: the one named, else the one that stores ``subject``.
    Naming a stream that cannot hold ``subject`` is an error, not an empty answer."""
    holder = stream_holding(subject) if subject is not None else None
    if stream is None:
        return holder or EVENTS_STREAM
    named = stream_named(stream)
    if holder is not None and holder != named:
        raise ConfigError(
            f"{named} stores no {subject!r}: those subjects are in {holder}",
            hint=f"drop --stream, or pass --stream {holder}",
        )
    return named
