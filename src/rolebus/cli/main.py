"""The ``rolebus`` console entry point: every command group, registered here, in the
order of ``--help``: running first, then publishing, then the rest. Each module of
``rolebus.cli`` is one command group, named after it."""

from __future__ import annotations

from rolebus.cli import (
    auth,
    budget,
    cancel,
    contracts,
    dashboard,
    demo,
    dlq,
    escalations,
    lifecycle,
    llm,
    metrics,
    prompt,
    publish,
    rebuild,
    replay,
    rerun,
    roles,
    server,
    show,
    status,
    storage,
    subjects,
    tasks,
    workers,
)
from rolebus.cli.app import app, run_app

__all__ = ["main"]

# Running the bus.
app.command("server")(server.server)
app.command("provision")(server.provision)
app.command("auth")(auth.auth_command)
app.add_typer(roles.roles_app, name="roles")
app.command("worker")(workers.worker)
app.command("up")(workers.up)
# Publishing.
app.command("publish")(publish.publish)
app.command("publish-file")(publish.publish_file)
app.command("subjects")(subjects.subjects_command)
# Contracts, escalations, cancels.
app.add_typer(contracts.contracts_app, name="contracts")
app.command("escalations")(escalations.escalations_command)
app.command("resolve")(escalations.resolve_command)
app.command("cancel")(cancel.cancel_command)
# History.
app.command("demo")(demo.demo)
app.command("replay")(replay.replay_command)
app.command("show")(show.show_command)
app.command("tasks")(tasks.tasks_command)
app.command("rebuild")(rebuild.rebuild_command)
# What-if.
app.command("rerun")(rerun.rerun_command)
app.command("prompt")(prompt.prompt_command)
# Watching.
app.command("status")(status.status_command)
app.command("metrics")(metrics.metrics_command)
app.command("dashboard")(dashboard.dashboard_command)
# Budgets, dead letters, the lifecycle, models, storage.
app.command("budget")(budget.budget_command)
app.add_typer(dlq.dlq_app, name="dlq")
app.command("lifecycle")(lifecycle.lifecycle)
app.add_typer(llm.llm_app, name="llm")
app.command("storage")(storage.storage)


def main(argv: list[str] | None = None) -> None:
    """Run the app, turning rolebus errors into clean exits (never a traceback)."""
    run_app(app, argv)
