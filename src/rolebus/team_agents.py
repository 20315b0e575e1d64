"""The team's scripted agents: what each role of the demo does, deterministically.

Each is an ordinary handler; together they play a feature through the team
(see ``rolebus demo``). Until a role has its own script it follows the generic
``scripted`` directives.
"""

from __future__ import annotations

from rolebus.agents import scripted
from rolebus.handlers import Handler

__all__ = ["TEAM_AGENTS"]

TEAM_AGENTS: dict[str, Handler] = {
    role: scripted for role in ("cto", "pm", "architect", "eng-be", "eng-fe", "perf-eng")
}
