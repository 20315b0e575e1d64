"""`rolebus subjects`: every subject, its stream and who reads it."""

from __future__ import annotations

from rich.table import Table

from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    out,
    print_json,
    settings_for,
    team_for,
)
from rolebus.team.roles import Team
from rolebus.wire import subjects as names

# --- publishing --------------------------------------------------------------------------


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
            "subject": "event.task.<state>.<role>.<task_id>",
            "stream": names.EVENTS_STREAM,
            "message": "Event with record: a task's record (its history and its state)",
            "read_by": "workers (their own tasks), history, replay, projections",
        },
        {
            "subject": "event.task.<state>.<role>.<task_id>.<attempt>",
            "stream": names.EVENTS_STREAM,
            "message": "Event: a note about a running attempt (claimed, progress)",
            "read_by": "replay, the dashboard",
        },
        {
            "subject": "event.<entity>.<state>",
            "stream": names.EVENTS_STREAM,
            "message": "Event (escalation, handoff, budget)",
            "read_by": "history, replay, projections",
        },
        {
            "subject": "dlq.<role>.<original subject>",
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
