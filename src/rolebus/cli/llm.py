"""``rolebus llm check``: what a model server honours, and the settings to use."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.table import Table

from rolebus.cli.app import JsonOption, RolesOption, out, print_json, run, settings_for
from rolebus.errors import ConfigError
from rolebus.handlers.probe import Report, check_server
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import load_team

llm_app = typer.Typer(help="LLM roles: check the model server a role runs on.")


def _spec(
    role: str | None, base_url: str | None, model: str | None, roles: RolesOption
) -> LlmHandler:
    if role is None and base_url is not None:
        return LlmHandler(llm=model or "default", base_url=base_url)
    team = load_team(settings_for(roles).roles_dir)
    llm_roles = [r for r in team if isinstance(r.handler, LlmHandler)]
    if not llm_roles:
        raise ConfigError(
            "no LLM role in the team", hint="give --base-url URL (and --model NAME) instead"
        )
    chosen = next((r for r in llm_roles if r.id == role), None) if role else llm_roles[0]
    if chosen is None:
        names = ", ".join(r.id for r in llm_roles)
        raise ConfigError(f"{role!r} is not an LLM role", hint=f"LLM roles: {names}")
    assert isinstance(chosen.handler, LlmHandler)
    changes = {"base_url": base_url} if base_url else {}
    changes |= {"llm": model} if model else {}
    return chosen.handler.model_copy(update=changes)


@llm_app.command("check")
def check(
    role: Annotated[str | None, typer.Argument(help="An LLM role (default: the first).")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="The server's /v1 URL (over the role's).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model's name (over the role's).")] = None,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask a model server once each way (a prompted answer, json_schema, json_object,
    a tool call, streaming and its usage, the context window) and print what works and
    the role-file settings to use.

    Example: `rolebus llm check eng-be`, or `rolebus llm check --base-url
    http://localhost:8080/v1 --model smollm2`. A few small requests; the key is read
    from the role's api_key_env, as the worker reads it.
    """
    spec = _spec(role, base_url, model, roles)
    report = run(check_server(spec, key=os.environ.get(spec.api_key_env) or ""))
    if as_json:
        print_json(report.as_json())
        return
    _show(report)


def _show(report: Report) -> None:
    table = Table(
        "probe", "works", "what the server said", title=f"{report.model} at {report.where}"
    )
    marks = {True: "[green]yes[/]", False: "[red]no[/]", None: "[dim]?[/]"}
    for finding in report.findings:
        table.add_row(finding.probe, marks[finding.works], finding.detail)
    out.print(table)
    settings = report.settings
    if settings["mode"] is None:
        out.print("[bold red]no answer mode works:[/] see what the server said above")
        return
    fields = ", ".join(
        f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {str(value).lower()}"
        for key, value in settings.items()
    )
    out.print(f"role-file settings for this server: handler = {{ ..., {fields} }}")
