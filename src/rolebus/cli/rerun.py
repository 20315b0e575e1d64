"""`rolebus rerun`: what-if, a role's handler again on recorded inputs."""

from __future__ import annotations

import shlex
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from pydantic import ValidationError
from rich.table import Table

from rolebus.bus import Bus
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
from rolebus.errors import ConfigError
from rolebus.handlers.llm import LlmRunner
from rolebus.handlers.loader import load_handler
from rolebus.handlers.pricing import cost_usd
from rolebus.history.replay import all_states, parse_since
from rolebus.history.rerun import RerunResult, rerun
from rolebus.history.whatif import FailOn, KeptRun, compare, failed_gate, rows_of, totals
from rolebus.team.handler_specs import CommandHandler, LlmHandler
from rolebus.team.roles import RoleSpec
from rolebus.wire.codec import validation_problems


def rerun_command(
    role: Annotated[
        str | None, typer.Option(help="Whose recorded inputs to replay (not with --compare).")
    ] = None,
    handler: Annotated[
        str | None,
        typer.Option(
            help="The handler to try: builtin:NAME, python:module:function, or a command "
            "line (run with the command protocol). Default: the role's own, as its role "
            "file says now (a changed persona or model, say)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Try another model (an LLM role): its calls are asked.")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="...served here (an OpenAI-compatible /v1).")
    ] = None,
    changes: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change the role for this run: persona=@FILE, or a handler setting "
            "(temperature=0.7, max_tokens=800, mode=json_object, ...). Repeatable.",
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Ask the model for every call. Without it, calls are answered from their "
            "records; with --model, --base-url or --set, only the calls the change touches "
            "are asked.",
        ),
    ] = False,
    correlation: Annotated[str | None, typer.Option(help="Only this flow.")] = None,
    since: Annotated[str | None, typer.Option(help="Only inputs since (time or 10m).")] = None,
    include_failed: Annotated[
        bool, typer.Option("--include-failed", help="Dead and rejected inputs too.")
    ] = False,
    max_cost: Annotated[
        float | None,
        typer.Option(
            "--max-cost",
            help="Refuse to start when the estimate (recorded tokens at the new model's "
            "price) is above this many US dollars.",
        ),
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            help="Exit 1 when any input changed ('changed'), or when the change is worse "
            "('worse': an input that completed no longer does, or cost grows more than "
            "--cost-share). Without it: exit 1 when any differs.",
        ),
    ] = None,
    cost_share: Annotated[
        float, typer.Option("--cost-share", help="With --fail-on worse: cost growth allowed.")
    ] = 0.2,
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            help="Run each input N times (a model answers differently each time): a row "
            "per sample; with --fail-on worse, one lost sample is a loss.",
        ),
    ] = 1,
    compare_runs: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--compare",
            help="Compare two kept runs (RUN_A RUN_B), asking no model.",
            metavar="RUN_A RUN_B",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per command run.")] = 300.0,
    roles: RolesOption = None,
    as_json: JsonOption = False,
) -> None:
    """What-if: feed a role's recorded inputs to a changed role or handler WITHOUT
    publishing anything, and compare, per input, status, valid first try, repair turns,
    tokens, cost and model time with what was recorded.

    Each run is kept (its id is printed) so that `--compare RUN_A RUN_B` compares two
    runs later without asking again. Examples:

      rolebus rerun --role eng-be                      # from the records: costs nothing
      rolebus rerun --role eng-be --model gpt-4o-mini  # asks only what the change touches
      rolebus rerun --role pm --set persona=@pm-v2.md --fail-on worse
    """
    settings = settings_for(roles)
    if fail_on not in (None, "changed", "worse"):
        raise ConfigError(f"--fail-on {fail_on!r}", hint="use --fail-on changed or worse")
    gate = cast("FailOn | None", fail_on)
    if compare_runs is not None:
        first, second = (KeptRun.load(settings.home, run_id) for run_id in compare_runs)
        rows = compare(first, second)
        _report(rows, gate, cost_share, as_json, run_id=None, header=f"{first.id} -> {second.id}")
        return
    if role is None:
        raise ConfigError("rerun needs --role ROLE (or --compare RUN_A RUN_B)")
    team = team_for(settings)
    spec = _changed(team.role(role), model, base_url, changes or [])
    changed = spec != team.role(role)
    if handler is None:
        chosen = load_handler(spec.handler, role=role)
    elif handler.startswith(("builtin:", "python:")):
        chosen = load_handler(handler, role=role)
    else:
        chosen = load_handler(CommandHandler(command=shlex.split(handler), timeout=timeout))
    start = parse_since(since) if since else None
    if samples < 1 or (samples > 1 and not (live or changed)):
        raise ConfigError(
            f"--samples {samples}: from the records every sample is the same",
            hint="sample a change (--model, --set) or --live, with --samples 2 or more",
        )

    async def go() -> list[tuple[int, RerunResult]]:
        async with await Bus.connect(settings, name="rolebus-rerun") as bus:
            if (changed or live) and isinstance(spec.handler, LlmHandler):
                estimate = await _estimate(bus, spec, correlation, start)
                shown = (
                    "unknown (no price for the model)" if estimate is None else f"${estimate:.4f}"
                )
                err.print(f"estimated cost of the calls to ask: {shown}", highlight=False)
                if max_cost is not None and (estimate is None or estimate > max_cost):
                    raise ConfigError(
                        f"the estimated cost {shown} is above --max-cost {max_cost:g}",
                        hint="narrow it with --correlation or --since, or raise --max-cost",
                    )
            try:
                results: list[tuple[int, RerunResult]] = []
                for sample in range(samples):
                    results += [
                        (sample, result)
                        async for result in rerun(
                            bus.connection,
                            spec,
                            chosen,
                            correlation=correlation,
                            since=start,
                            team=team,
                            live=live,
                            changed=changed,
                            include_failed=include_failed,
                        )
                    ]
                return results
            finally:
                if isinstance(chosen, LlmRunner):
                    await chosen.aclose()

    ran = run(go())
    rows = rows_of([result for _, result in ran])
    if samples > 1:
        for row, (sample, _) in zip(rows, ran, strict=True):
            row["sample"] = sample + 1
    kept = KeptRun.new(
        {
            "role": role,
            "model": model,
            "base_url": base_url,
            "set": changes or [],
            "handler": handler,
            "live": live,
            "correlation": correlation,
            "since": since,
        },
        rows,
    )
    kept.save(settings.home)
    _report(rows, gate, cost_share, as_json, run_id=kept.id, header=role)


def _changed(
    spec: RoleSpec, model: str | None, base_url: str | None, changes: list[str]
) -> RoleSpec:
    """The role as this run tries it."""
    handler_changes: dict[str, Any] = {}
    if model is not None:
        handler_changes["llm"] = model
    if base_url is not None:
        handler_changes["base_url"] = base_url
    persona = spec.persona
    for change in changes:
        key, equals, value = change.partition("=")
        if not equals:
            raise ConfigError(
                f"--set {change!r} is not KEY=VALUE", hint="e.g. --set temperature=0.7"
            )
        if key == "persona":
            persona = (
                Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
            )
        else:
            handler_changes[key] = value
    if handler_changes and not isinstance(spec.handler, LlmHandler):
        raise ConfigError(
            f"role {spec.id!r} has no llm handler: --model, --base-url and --set of handler "
            "settings apply to LLM roles",
        )
    updated = spec.model_copy(update={"persona": persona})
    if handler_changes and isinstance(spec.handler, LlmHandler):
        try:
            new_handler = LlmHandler.model_validate(
                {**spec.handler.model_dump(), **handler_changes}
            )
        except ValidationError as error:
            raise ConfigError(
                f"the changed handler is not valid: {validation_problems(error)}",
                hint="see the llm handler settings in the README",
            ) from error
        updated = updated.model_copy(update={"handler": new_handler})
    return updated


async def _estimate(
    bus: Bus, spec: RoleSpec, correlation: str | None, since: datetime | None
) -> float | None:
    """The recorded inputs' tokens at the changed model's price."""
    assert isinstance(spec.handler, LlmHandler)
    prompt = completion = 0
    for state in await all_states(bus.connection):
        if state.role != spec.id:
            continue
        if correlation is not None and correlation not in (state.correlation_id, state.task_id):
            continue
        if since is not None and (state.created_at is None or state.created_at < since):
            continue
        usage = (state.outcome or {}).get("usage") or state.detail.get("usage") or {}
        prompt += int(usage.get("prompt_tokens", 0))
        completion += int(usage.get("completion_tokens", 0))
    return cost_usd(
        spec.handler.llm,
        prompt,
        completion,
        base_url=spec.handler.base_url,
        prices=spec.handler.prices,
    )


def _money(value: Any) -> str:
    return "-" if value is None else f"${float(value):.4f}"


def _report(
    rows: list[dict[str, Any]],
    gate: FailOn | None,
    cost_share: float,
    as_json: bool,
    *,
    run_id: str | None,
    header: str,
) -> None:
    summary = totals(rows)
    refused = failed_gate(rows, gate, cost_share)
    if as_json:
        print_json({"run": run_id, "rows": rows, "totals": summary, "gate": refused or None})
    else:
        table = Table(
            "task", "title", "status", "1st try", "repairs", "tokens", "cost", "model time", "asked"
        )
        for row in rows:
            old, new = row["old"], row["new"]
            if row["error"] is not None:
                table.add_row(row["task_id"], row["title"], "[yellow]error[/]", row["error"])
                continue
            mark = "[red]changed[/] " if row["changed"] else ""
            table.add_row(
                row["task_id"],
                row["title"],
                f"{mark}{old['status']} -> {new['status']}",
                f"{old['valid_first_try']} -> {new['valid_first_try']}",
                f"{old['repairs']} -> {new['repairs']}",
                f"{old['tokens']} -> {new['tokens']}",
                f"{_money(old['cost_usd'])} -> {_money(new['cost_usd'])}",
                f"{old['latency_ms'] or 0:.0f} -> {new['latency_ms'] or 0:.0f} ms",
                str(new["asked"]),
            )
        out.print(table)
        out.print(
            f"{header}: {summary['inputs']} input(s), {summary['changed']} changed "
            f"({summary['changed_share']:.0%}), {summary['errors']} error(s); completed "
            f"{summary['completed']['old']} -> {summary['completed']['new']}; tokens "
            f"{summary['tokens']['old']:.0f} -> {summary['tokens']['new']:.0f}; cost "
            f"{_money(summary['cost_usd']['old'])} -> {_money(summary['cost_usd']['new'])}; "
            f"{summary['asked']['new']:.0f} call(s) asked",
            highlight=False,
        )
        if run_id is not None:
            out.print(f"kept as run {run_id} (`rolebus rerun --compare {run_id} LATER_RUN`)")
        if refused:
            err.print(f"[red]--fail-on {gate}[/]: {refused}", highlight=False)
    if refused or (gate is None and any(row["changed"] or row["error"] for row in rows)):
        raise typer.Exit(1)
