"""The bounds on loops a model can drive, checked before an answer is acted on: how
many times one task may ask (``max_escalations``), and what one flow may make a role
send (``[brakes]``: follow-ups per task, depth, tasks per flow). A bound met turns
the answer into a ``brake`` approval the bus asks (see :mod:`rolebus.team.authority`);
approving lets the task go as far again.
"""

from __future__ import annotations

from rolebus.flows.record import TaskState
from rolebus.team.authority import brake_request, depth_in_flow, quoted
from rolebus.team.roles import RoleSpec
from rolebus.wire.messages import EscalationRequest, Task

__all__ = ["BrakeCheck"]


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

    def flow(
        self, task: Task, record: TaskState, follow_ups: int
    ) -> tuple[EscalationRequest | None, int]:
        """The brake these follow-ups meet (None: none), and the flow budget each of
        them gets: what this task may still cause, less what it sends, shared out.
        No write: the bound travels with the work (``Task.flow_budget``), and each
        role takes the smaller of what it received and its own limit, so a flow's
        tasks below any root stay bounded without a counter anyone could poison."""
        brakes = self.role.brakes
        approved = int(record.detail.get("brakes_approved", 0))
        times = 1 + approved
        limit = brakes.tasks_per_flow
        budget = min(limit if task.flow_budget is None else task.flow_budget, limit)
        budget += limit * approved
        if not follow_ups:
            return None, 0
        fan_out = brakes.follow_ups_per_task * times
        if follow_ups > fan_out:
            asked = f"task {task.id} asks to send {follow_ups} follow-ups at once"
            return brake_request(
                self.role, limit="follow_ups_per_task", value=fan_out, asked=asked
            ), 0
        depth = brakes.depth * times
        if depth_in_flow(task) + 1 > depth:
            asked = f"task {task.id} is {depth_in_flow(task)} generations deep and asks for more"
            return brake_request(self.role, limit="depth", value=depth, asked=asked), 0
        if follow_ups > budget:
            asked = (
                f"task {task.id} of flow {task.flow_id} may cause {budget} more tasks and "
                f"asks for {follow_ups}"
            )
            return brake_request(self.role, limit="tasks_per_flow", value=limit, asked=asked), 0
        return None, (budget - follow_ups) // follow_ups
