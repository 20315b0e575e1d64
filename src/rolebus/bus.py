"""The client API: connect to the bus and publish typed messages.

async with await Bus.connect(Settings.from_env()) as bus:
    task, ack = await bus.publish_task("task.backend.implement", title="Orders API")
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError

from rolebus.config import Settings
from rolebus.errors import ConfigError, ConnectError, SubjectError
from rolebus.nats.admin import StreamLimits
from rolebus.nats.connection import Connection
from rolebus.nats.protocol import PubAck
from rolebus.nats.server import running_server_url
from rolebus.team.auth import inbox_prefix as role_inbox_prefix
from rolebus.team.roles import Team
from rolebus.wire import codec
from rolebus.wire.headers import Header
from rolebus.wire.messages import MAX_DEPTH, Envelope, Task
from rolebus.wire.subjects import TASK, parse_subject, task_subject, with_sender
from rolebus.wire.trace import new_traceparent

__all__ = ["Bus", "resolve_url"]

log = structlog.get_logger("rolebus.bus")


EnvelopeT = TypeVar("EnvelopeT", bound=Envelope)


def resolve_url(settings: Settings) -> str:
    """``NATS_URL`` if set, else the embedded server of this state folder, else an
    error that says what to run."""
    if settings.nats_url:
        return settings.nats_url
    url = running_server_url(settings.home)
    if url is None:
        raise ConnectError(
            f"no NATS server: NATS_URL is not set and no embedded server runs for "
            f"the state folder {str(settings.home)!r}",
            hint="run `rolebus server` in another terminal (or `rolebus up` for the whole "
            "team), or set NATS_URL=nats://host:4222 to use an existing server",
        )
    return url


class Bus:
    """A connection to the bus, with the streams provisioned."""

    def __init__(self, connection: Connection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        *,
        name: str = "rolebus",
        provision: bool = True,
        limits: StreamLimits | None = None,
        inbox_prefix: str | None = None,
    ) -> Bus:
        # A role's user (rolebus auth) may listen only on its own inbox prefix, and
        # provisioning is the admin's: the streams exist already for it.
        role_user = settings.role_user
        if role_user and inbox_prefix is None:
            inbox_prefix = role_inbox_prefix(role_user)
        provision = provision and not role_user
        # Without NATS_URL the server is this state folder's embedded one: if it is
        # restarted on another port, the connection follows it there.
        follow = None if settings.nats_url else (lambda: running_server_url(settings.home))
        connection = await Connection.open(
            settings,
            resolve_url(settings),
            name=name,
            inbox_prefix=inbox_prefix,
            url_source=follow,
        )
        try:
            if provision:
                await connection.admin.provision(
                    limits
                    or StreamLimits(
                        replicas=settings.replicas, calls_max_age=settings.calls_retention
                    )
                )
        except BaseException:
            await connection.close()
            raise
        return cls(connection, settings)

    def _as_this_role(self, message: EnvelopeT) -> EnvelopeT:
        """``message`` as the role whose user this connection is: the server lets that
        user publish only under its own sender token."""
        role = self.settings.role_user
        if role is None or message.from_role == role:
            return message
        if message.from_role is not None:
            raise SubjectError(
                f"not sent: this connection is {role}'s user, which sends as {role}, "
                f"not as {message.from_role}",
                subject=message.from_role,
                hint=f"leave from_role out (it becomes {role}), or connect as "
                f"{message.from_role}'s user",
            )
        return message.model_copy(update={"from_role": role})

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        subject: str,
        message: Envelope,
        *,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """Publish one message; its id is the Msg-Id, so publishing it again is a no-op.
        A message with ``from_role`` goes out under that role's sender token
        (``task.<domain>.<kind>.<role>``), which only that role's user may publish on;
        connected as a role's user, a message is that role's."""
        message = self._as_this_role(message)
        subject = sent_subject(subject, message)
        all_headers = {Header.TRACEPARENT: new_traceparent(), **(headers or {})}
        return await self.connection.publish(
            subject, codec.encode(message), msg_id=message.id, headers=all_headers
        )

    async def publish_many(
        self, messages: Sequence[tuple[str, Envelope]], *, window: int = 1000
    ) -> list[PubAck]:
        """Publish many messages, up to ``window`` at once, stored as atomic batches
        (group commit: one fsync a batch); each still stored once per id."""
        mine = [(subject, self._as_this_role(message)) for subject, message in messages]
        messages = [(sent_subject(subject, message), message) for subject, message in mine]
        trace = new_traceparent()
        return await self.connection.publish_many(
            [
                (subject, codec.encode(message), message.id, {Header.TRACEPARENT: trace})
                for subject, message in messages
            ],
            window=window,
        )

    async def publish_task(
        self,
        subject: str,
        *,
        title: str,
        kind: str | None = None,
        payload: dict[str, Any] | None = None,
        team: Team | None = None,
        **fields: Any,
    ) -> tuple[Task, PubAck]:
        """Build and publish a Task. ``subject`` is ``task.<domain>.<kind>``, or
        ``task.<domain>`` with ``kind``. With ``team``, the domain must have an owner."""
        subject = task_subject_for(subject, kind)
        parsed = parse_subject(subject)
        if team is not None:
            team.owner_of(parsed.second)
        try:
            task = Task(kind=parsed.third, title=title, payload=payload or {}, **fields)
        except ValidationError as error:
            raise ConfigError(
                f"not a valid task: {codec.validation_problems(error)}",
                hint="ids are letters, digits, '_' and '-'; payloads nest at most "
                f"{MAX_DEPTH} levels and hold 64-bit integers and finite numbers",
            ) from error
        ack = await self.publish(subject, task)
        log.debug("task published", task_id=task.id, subject=subject, seq=ack.seq)
        return task, ack


def sent_subject(subject: str, message: Envelope) -> str:
    """``subject`` checked, with ``message``'s sender token added (see ``Bus.publish``);
    a subject that names another sender than the body is refused before it is sent."""
    sent = with_sender(subject, message.from_role)
    parse_subject(sent)
    mismatch = codec.disagreement(sent, message)
    if mismatch is not None:
        raise SubjectError(
            f"not sent: the body disagrees with the subject: {mismatch}",
            subject=sent,
            hint="make the body's fields and the subject's tokens agree (subjects.md)",
        )
    return sent


def task_subject_for(subject: str, kind: str | None) -> str:
    """Complete ``task.<domain>`` with ``kind``; check a full subject agrees with it."""
    tokens = subject.split(".")
    if tokens[0] != TASK:
        raise SubjectError(
            f"{subject!r} is not a task subject",
            subject=subject,
            hint="tasks go to task.<domain>.<kind>, e.g. task.backend.implement",
        )
    if len(tokens) == 2:
        if kind is None:
            raise SubjectError(
                f"subject {subject!r} has no kind",
                subject=subject,
                hint=f"give --kind, or publish to {subject}.<kind>",
            )
        return task_subject(tokens[1], kind)
    if kind is not None and len(tokens) >= 3 and tokens[2] != kind:
        raise SubjectError(
            f"--kind {kind!r} disagrees with the subject's kind {tokens[2]!r}",
            subject=subject,
            hint=f"publish to task.{tokens[1]}.{kind}, or drop --kind",
        )
    return subject
