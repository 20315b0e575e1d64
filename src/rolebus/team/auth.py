"""Least privilege: a nats-server authorization config generated from the role files.

One ``admin`` user provisions streams, buckets and the roles' consumers, and is
the only one that may delete or purge anything. Each role gets a user that may:

- pull from its own consumer and ack its own messages, and nothing else's;
- publish tasks, handoffs and escalations (any role can hand work on or ask),
  decisions only to the roles that can escalate to it (its rules' askers and
  everyone below it in the chart), each only under its own sender token
  (``task.<domain>.<kind>.<role>``); its own tasks' records, its dead letters,
  its handoff and escalation events (under its token too) and escalation timers;
- read its own tasks' records, its own model calls and budget entries, and the
  contract, escalation, cancel and rate-limit buckets; write, each only under its own
  token, contract versions (none of a contract the role files give only to other
  roles) and answers, escalation steps, model calls and its spending (not its
  caps, not cancels); and the shared model rate limits;
- receive replies only on its own inbox prefix (``_INBOX_<role>``).

Everything not allowed is denied: another role's consumer, a decision to a
role that never asks this one, any stream or consumer deletion or purge.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rolebus.config import ADMIN_USER
from rolebus.errors import ConfigError
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire.subjects import (
    BUCKETS,
    BUDGETS_BUCKET,
    CALLS_BUCKET,
    CONTRACTS_BUCKET,
    DLQ_STREAM,
    ESCALATIONS_BUCKET,
    EVENTS_STREAM,
    LIMITS_BUCKET,
    PARTS_BUCKET,
    SUPERVISOR_CONSUMER,
    TIMERS_STREAM,
    WORK_STREAM,
    consumer_name,
    key_reader_api_subjects,
    reader_api_subjects,
)

__all__ = ["ADMIN", "Credentials", "askers_of", "inbox_prefix", "permissions", "render_config"]

ADMIN = ADMIN_USER
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
    # Buckets every role reads whole (any role may be handed a contract or hold an
    # escalation; cancels and rate limits concern every worker); its own model calls
    # and budget entries it reads key by key, under its own token only.
    own = (CALLS_BUCKET, PARTS_BUCKET, BUDGETS_BUCKET)
    reads = [f"KV_{bucket}" for bucket in BUCKETS if bucket not in own]
    publish = [
        # its own work: pull, ack, heartbeat; look its consumer up
        f"{_API}.CONSUMER.MSG.NEXT.{WORK_STREAM}.{consumer}",
        f"{_API}.CONSUMER.INFO.{WORK_STREAM}.{consumer}",
        f"$JS.ACK.{WORK_STREAM}.{consumer}.>",
        # the escalation supervisor every worker process runs
        f"{_API}.CONSUMER.MSG.NEXT.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}",
        f"{_API}.CONSUMER.INFO.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}",
        f"$JS.ACK.{TIMERS_STREAM}.{SUPERVISOR_CONSUMER}.>",
        # what a role sends, each under its own sender token (readers take the
        # sender from there, not from the body's from_role)
        f"task.*.*.{role.id}",
        f"handoff.*.*.{role.id}",
        f"escalation.*.*.{role.id}",
        *[f"decision.{asker}.*.{role.id}" for asker in sorted(askers_of(team, role.id))],
        # its tasks' records and notes (the role token pins them to it); the
        # handoff and escalation events it writes
        f"event.task.*.{role.id}.*",
        f"event.task.*.{role.id}.*.*",
        f"event.handoff.*.{role.id}",
        f"event.escalation.*.{role.id}",
        # reading its tasks' records and notes back (the subject names what may be read)
        f"{_API}.DIRECT.GET.{EVENTS_STREAM}.event.task.*.{role.id}.*",
        f"{_API}.DIRECT.GET.{EVENTS_STREAM}.event.task.*.{role.id}.*.*",
        f"dlq.{role.id}.>",  # its own dead letters only
        "timer.schedule.>",
        # buckets: each write under the writer's token where there is one (reads
        # below)
        f"$KV.{CONTRACTS_BUCKET}.v.{role.id}.>",  # its contract versions
        f"$KV.{CONTRACTS_BUCKET}.a.{role.id}.>",  # its answers to them
        f"$KV.{ESCALATIONS_BUCKET}.e.{role.id}.>",  # its escalation steps
        f"$KV.{CALLS_BUCKET}.{role.id}.>",  # its recorded model calls
        f"$KV.{PARTS_BUCKET}.{role.id}.>",  # and their parts
        f"$KV.{BUDGETS_BUCKET}.{role.id}.day.>",  # its spending, not its caps
        f"$KV.{BUDGETS_BUCKET}.{role.id}.task.>",
        f"$KV.{LIMITS_BUCKET}.>",  # model rate limits: one slot per model, shared
        # (cancels: read only; `rolebus cancel` is the operator's)
        *[subject for stream in reads for subject in reader_api_subjects(stream)],
        *[subject for bucket in own for subject in key_reader_api_subjects(bucket, f"{role.id}.>")],
        # (not the work stream by sequence: that would be any role's work)
        f"{_API}.STREAM.INFO.{WORK_STREAM}",
        f"{_API}.STREAM.INFO.{EVENTS_STREAM}",
        f"{_API}.STREAM.INFO.{DLQ_STREAM}",
        f"{_API}.STREAM.INFO.{TIMERS_STREAM}",
        f"{_API}.INFO",
    ]
    # Contracts that role files give to other roles: not even under its own token.
    theirs = {name for other in team for name in other.contracts} - set(role.contracts)
    deny = [f"$KV.{CONTRACTS_BUCKET}.v.{role.id}.{name}.>" for name in sorted(theirs)]
    subscribe = [
        f"{inbox_prefix(role.id)}.>",
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{WORK_STREAM}.{consumer}",
    ]
    return {
        "publish": {"allow": publish, **({"deny": deny} if deny else {})},
        "subscribe": {"allow": subscribe},
    }


@dataclass(frozen=True)
class Credentials:
    """For the admin and each role, in a secrets folder (0600 files): a password
    (``<user>.password``), or with ``nkeys`` an nkey seed (``<user>.nk``), of which
    the config holds only the public key."""

    passwords: dict[str, str]
    #: user -> nkey public key (then ``passwords`` is empty).
    nkeys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, folder: Path, users: list[str], *, nkeys: bool = False) -> Credentials:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        if nkeys:
            return cls({}, {user: _nkey_public(folder / f"{user}.nk") for user in users})
        passwords = {}
        for user in users:
            path = folder / f"{user}.password"
            if not path.exists():
                _write_secret(path, secrets.token_urlsafe(24))
            passwords[user] = path.read_text().strip()
        return cls(passwords)

    @property
    def secret(self) -> bool:
        """Whether the config made from these holds secrets (passwords do; nkeys do not)."""
        return not self.nkeys


def _write_secret(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _nkey_public(path: Path) -> str:
    """The public key of the user nkey seed at ``path``, made first if it is missing."""
    import nkeys  # nats-py's own dependency for nkey and creds authentication

    if not path.exists():
        _write_secret(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    try:
        return str(nkeys.from_seed(path.read_bytes().strip()).public_key.decode())
    except (nkeys.NkeysError, ValueError) as error:
        raise ConfigError(
            f"{path} is not a user nkey seed ({error})",
            hint="delete it and run `rolebus auth --nkeys` again to make a new one",
        ) from None


def render_config(team: Team, credentials: Credentials) -> str:
    """An ``authorization { users = [...] }`` block for nats-server."""

    def entry(user: str, perms: dict[str, Any] | None) -> str:
        document: dict[str, Any] = (
            {"nkey": credentials.nkeys[user]}
            if credentials.nkeys
            else {"user": user, "password": credentials.passwords[user]}
        )
        if perms is not None:
            document["permissions"] = perms
        return "    " + json.dumps(document)

    users = [entry(ADMIN, None)] + [entry(role.id, permissions(team, role)) for role in team]
    header = (
        "# Generated by `rolebus auth` from the role files: one user per role, least\n"
        "# privilege; the admin user provisions streams and consumers.\n"
    )
    return header + "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"
