"""rolebus: an event-driven task bus for teams of role agents, on NATS JetStream."""

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import RolebusError
from rolebus.team.roles import RoleSpec, Team, load_team
from rolebus.wire.messages import (
    Decision,
    Escalation,
    Event,
    FollowUp,
    Handoff,
    Outcome,
    Task,
)

__all__ = [
    "Bus",
    "Decision",
    "Escalation",
    "Event",
    "FollowUp",
    "Handoff",
    "Outcome",
    "RoleSpec",
    "RolebusError",
    "Settings",
    "Task",
    "Team",
    "load_team",
]

__version__ = "0.1.0"
