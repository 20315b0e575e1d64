"""A role's ``then`` routes: the team's process written down, as follow-ups (pure)."""

from __future__ import annotations

from rolebus.team.roles import RoleSpec
from rolebus.wire.messages import FollowUp, Outcome, Task

__all__ = ["with_routes"]


def with_routes(role: RoleSpec, task: Task, outcome: Outcome) -> Outcome:
    """``outcome`` with the tasks the role's ``then`` routes file after it (none to a
    subject the handler already asked for)."""
    if outcome.status != "completed" or not role.then:
        return outcome
    asked = {follow_up.subject for follow_up in outcome.tasks}
    routed = [
        FollowUp(
            subject=route.subject,
            title=route.title.replace("{title}", task.title).replace("{kind}", task.kind),
            payload={"after": {"title": task.title, "kind": task.kind, "result": outcome.result}},
        )
        for route in role.then
        if route.applies_to(task.kind) and route.subject not in asked
    ]
    return outcome.model_copy(update={"tasks": [*outcome.tasks, *routed]}) if routed else outcome
