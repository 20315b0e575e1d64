"""The ``rolebus`` console entry point: the app with every command group on it."""

from __future__ import annotations

# Each module registers its commands on ``app`` when imported; the import order is
# the order of ``--help``: running first, then publishing, then the rest.
# isort: off
from rolebus.cli import run, publish, flow, history, whatif, watch, budget, dlq  # noqa: F401
from rolebus.cli import lifecycle, llm, storage  # noqa: F401

# isort: on
from rolebus.cli.app import app, run_app

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the app, turning rolebus errors into clean exits (never a traceback)."""
    run_app(app, argv)
