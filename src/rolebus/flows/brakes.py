"""The bounds on loops a model can drive, checked before an answer is acted on: how
many times one task may ask (``max_escalations``), and what one flow may make a role
send (``[brakes]``: follow-ups per task, depth, tasks per flow). A bound met turns
the answer into a ``brake`` approval the bus asks (see :mod:`rolebus.team.authority`);
approving lets the task go as far again.
"""

from __future__ import annotations

from dataclasses import dataclass

from rolebus.flows.record import TaskState
from rolebus.team.authority import brake_request, depth_in_flow, quoted
from rolebus.team.roles import RoleSpec
from rolebus.wire.messages import EscalationRequest, Task

__all__ = ["BrakeCheck", "Shares"]


class BrakeCheck:
    """One role's brakes."""

    def __init__(self, role: RoleSpec) -> None:
        self.role = role

    def rounds(self, record: TaskState, request: EscalationRequest) -> EscalationRequest | None:
        """The role's bound on escalation rounds, met: what the bus asks instead."""
        allowed = self.role.max_escalations * (1 + int(record.detail.get("brakes_approved", 0)))
        rounds = int(record.detail.get("escalations", 0))
        if rounds < allowed:
            return None
        asked = f"task {record.task_id} escalated {rounds} times and asks again: "
        return brake_request(
            self.role,
            limit="max_escalations",
            value=allowed,
            asked=asked + quoted(request.question),
        )

    def tokens_for(self, task: Task) -> int:
        """The model tokens ``task`` (with what it causes) may still spend in its flow:
        what it was given, never more than this role's own ``tokens_per_flow``. The
        budget gate refuses a call past it, and asks like any budget breach."""
        limit = self.role.brakes.tokens_per_flow
        return limit if task.flow_tokens is None else min(task.flow_tokens, limit)

    def usd_for(self, task: Task) -> float | None:
        """The US dollars ``task`` may still spend in its flow, likewise (None: no
        bound: neither its role nor anything it was given sets one)."""
        limit = self.role.brakes.usd_per_flow
        if limit is None or task.flow_usd is None:
            return task.flow_usd if limit is None else limit
        return min(task.flow_usd, limit)

    def flow(
        self,
        task: Task,
        record: TaskState,
        follow_ups: int,
        *,
        spent_tokens: int,
        spent_usd: float = 0.0,
    ) -> tuple[EscalationRequest | None, Shares]:
        """The brake these follow-ups meet (None: none), and what each of them gets:
        what this task may still cause (and spend), less what it sends (and spent),
        shared out. No write: the bounds travel with the work (``Task.flow_budget``,
        ``Task.flow_tokens``), and each role takes the smaller of what it received
        and its own limit, so a flow below any root stays bounded without a counter
        anyone could poison."""
        if not follow_ups:
            return None, _NONE
        brakes = self.role.brakes
        approved = int(record.detail.get("brakes_approved", 0))
        times = 1 + approved
        limit = brakes.tasks_per_flow
        budget = min(limit if task.flow_budget is None else task.flow_budget, limit)
        budget += limit * approved
        fan_out = brakes.follow_ups_per_task * times
        if follow_ups > fan_out:
            asked = f"task {task.id} asks to send {follow_ups} follow-ups at once"
            request = brake_request(
                self.role, limit="follow_ups_per_task", value=fan_out, asked=asked
            )
            return request, _NONE
        depth, deep = brakes.depth * times, depth_in_flow(task)
        if deep + 1 > depth:
            asked = f"task {task.id} is {deep} generations deep and asks for more"
            return brake_request(self.role, limit="depth", value=depth, asked=asked), _NONE
        if follow_ups > budget:
            asked = (
                f"task {task.id} of flow {task.flow_id} may cause {budget} more tasks and "
                f"asks for {follow_ups}"
            )
            request = brake_request(self.role, limit="tasks_per_flow", value=limit, asked=asked)
            return request, _NONE
        tokens_left = max(0, self.tokens_for(task) - spent_tokens)
        usd = self.usd_for(task)
        return None, Shares(
            tasks=(budget - follow_ups) // follow_ups,
            tokens=tokens_left // follow_ups,
            usd=None if usd is None else max(0.0, usd - spent_usd) / follow_ups,
        )


@dataclass(frozen=True)
class Shares:
    """What each follow-up may still cause (tasks) and spend (model tokens) in its flow."""

    tasks: int
    tokens: int
    usd: float | None = None


_NONE = Shares(0, 0)
