"""`rolebus roles`: list the team, or check its role files."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from rolebus.cli.app import (
    JsonOption,
    RolesOption,
    out,
    print_json,
    settings_for,
    team_for,
)
from rolebus.handlers.loader import check_team_handlers
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import RoleSpec

roles_app = typer.Typer(help="The team: list the roles, or check the role files.")


def _handler_label(role: RoleSpec) -> str:
    handler = role.handler
    if isinstance(handler, str):
        return handler
    if isinstance(handler, LlmHandler):
        return f"llm:{handler.llm}" + (f" at {handler.base_url}" if handler.base_url else "")
    return " ".join(handler.command)


def _role_row(role: RoleSpec) -> dict[str, Any]:
    handler = _handler_label(role)
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
    check_team_handlers(team)
    out.print(
        f"{len(team)} roles OK in {settings.roles_dir}: " + ", ".join(role.id for role in team)
    )


# --- workers -----------------------------------------------------------------------------
