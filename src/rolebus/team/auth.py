"""Least privilege: a nats-server authorization config generated from the role files.

One ``admin`` user provisions streams, buckets and the roles' consumers, and is
the only one that may delete or purge anything. Each role gets a user that may:

- pull from its own consumer and ack its own messages, and nothing else's;
- publish tasks, handoffs and escalations (any role can hand work on or ask),
  decisions only to the roles that can escalate to it (its rules' askers and
  everyone below it in the chart), events, dead letters and escalation timers;
- read and write the task, contract and escalation buckets;
- receive replies only on its own inbox prefix (``_INBOX_<role>``).

Everything not allowed is denied: another role's consumer, a decision to a
role that never asks this one, any stream or consumer deletion or purge.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rolebus.team.roles import RoleSpec, Team
from rolebus.wire.subjects import (
    BUCKETS,
    DLQ_STREAM,
    EVENTS_STREAM,
    SUPERVISOR_CONSUMER,
    TIMERS_STREAM,
    WORK_STREAM,
    consumer_name,
)

__all__ = ["ADMIN", "Credentials", "askers_of", "inbox_prefix", "permissions", "render_config"]

ADMIN = "admin"
_API = "$JS.API"


def inbox_prefix(role_id: str) -> str:
    """The reply subject prefix a role's connections use (and may only listen on)."""
    return f"_INBOX_{role_id}"


def askers_of(team: Team, role_id: str) -> set[str]:
    """Roles that can escalate to ``role_id``: by a rule naming it, or by climbing
    the chart from anywhere below it."""
    askers = set()
    for role in team:
        named = {rule.to for rule in role.escalate} | {
            rule.to for rule in role.never if rule.action == "approval"
        }
        if role_id in named or role_id in team.chain_above(role.id):
            askers.add(role.id)
    return askers


def permissions(team: Team, role: RoleSpec) -> dict[str, Any]:
    """The publish/subscribe permissions of one role's user."""
    consumer = consumer_name(role.id)
    reads = [f"KV_{bucket}" for bucket in BUCKETS]
    publish = [
        # its own work: pull, ack, heartbeat; look its consumer up
        f"{_API}.CONSUMER.MSG.NEXT.{WORK_STREAM}.{consumer}",
        f"{_API}.CONSUMER.INFO.{WORK_STREAM}.{consumer}",
        f"$JS.ACK.{WORK_STREAM}.{consumer}.>",
        # the escalation supervisor every worker process runs
        f"{_API}.CONSUMER.MSG.NEXT.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}",
        f"{_API}.CONSUMER.INFO.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}",
        f"$JS.ACK.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}.>",
        # what a role sends
        "task.>",
        "handoff.>",
        "escalation.>",
        *[f"decision.{asker}.>" for asker in sorted(askers_of(team, role.id))],
        "event.>",
        "dlq.>",
        "timer.schedule.>",
        # buckets: state, contracts, escalations (read, write, list)
        *[f"$KV.{bucket}.>" for bucket in BUCKETS],
        *[f"{_API}.STREAM.INFO.{stream}" for stream in reads],
        *[f"{_API}.DIRECT.GET.{stream}.>" for stream in reads],
        *[f"{_API}.CONSUMER.CREATE.{stream}.>" for stream in reads],
        *[f"{_API}.CONSUMER.MSG.NEXT.{stream}.>" for stream in reads],
        *[f"{_API}.CONSUMER.DELETE.{stream}.>" for stream in reads],
        # resuming a parked task reads its original message
        f"{_API}.DIRECT.GET.{WORK_STREAM}",
        f"{_API}.STREAM.MSG.GET.{WORK_STREAM}",
        f"{_API}.STREAM.INFO.{WORK_STREAM}",
        f"{_API}.STREAM.INFO.{EVENTS_STREAM}",
        f"{_API}.STREAM.INFO.{DLQ_STREAM}",
        f"{_API}.STREAM.INFO.{TIMERS_STREAM}",
        f"{_API}.INFO",
    ]
    subscribe = [
        f"{inbox_prefix(role.id)}.>",
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{WORK_STREAM}.{consumer}",
    ]
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
    }


@dataclass(frozen=True)
class Credentials:
    """Passwords for the admin and each role, kept in a secrets folder (0600 files)."""

    passwords: dict[str, str]

    @classmethod
    def load_or_create(cls, folder: Path, users: list[str]) -> Credentials:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        passwords = {}
        for user in users:
            path = folder / f"{user}.password"
            if not path.exists():
                path.write_text(secrets.token_urlsafe(24) + "\n")
                path.chmod(0o600)
            passwords[user] = path.read_text().strip()
        return cls(passwords)


def render_config(team: Team, credentials: Credentials) -> str:
    """An ``authorization { users = [...] }`` block for nats-server."""

    def entry(user: str, perms: dict[str, Any] | None) -> str:
        document: dict[str, Any] = {"user": user, "password": credentials.passwords[user]}
        if perms is not None:
            document["permissions"] = perms
        return "    " + json.dumps(document)

    users = [entry(ADMIN, None)] + [entry(role.id, permissions(team, role)) for role in team]
    header = (
        "# Generated by `rolebus auth` from the role files: one user per role, least\n"
        "# privilege; the admin user provisions streams and consumers.\n"
    )
    return header + "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"
