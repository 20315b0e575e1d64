"""msgpack <-> typed messages. The only module that imports msgpack.

The encoded form is a plain msgpack map of the model's JSON-mode fields
(timestamps as RFC 3339 strings), so any language can read and write it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from rolebus.errors import CodecError
from rolebus.wire.messages import (
    Decision,
    Envelope,
    Escalation,
    Event,
    Handoff,
    Task,
    from_nanoseconds,
)
from rolebus.wire.subjects import SENT_FAMILIES

__all__ = [
    "Origin",
    "decode",
    "decode_as",
    "decode_map",
    "disagreement",
    "encode",
    "encode_map",
    "message_type_for",
    "validation_problems",
]

MessageT = TypeVar("MessageT", bound=BaseModel)
_ID = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")

_TYPES: dict[str, type[Envelope]] = {
    "task": Task,
    "handoff": Handoff,
    "escalation": Escalation,
    "decision": Decision,
    "event": Event,
    "timer": Escalation,  # an escalation one level up, waiting for its deadline
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message was stored. A message published without ``id`` or
    ``created_at`` (subjects.md allows it) takes them from here, so every reader
    (the worker, replay, rerun) sees the same task: the id is the ``Nats-Msg-Id``
    the publisher gave, else ``seq-<stream sequence>``; the time is when it was
    stored."""

    seq: int
    #: When it was stored: a datetime, or nanoseconds since the epoch.
    time: datetime | int
    msg_id: str | None = None

    def stored_at(self) -> datetime:
        return self.time if isinstance(self.time, datetime) else from_nanoseconds(self.time)

    def fill(self, mapping: dict[str, Any]) -> None:
        if not mapping.get("id"):
            mapping["id"] = (
                self.msg_id if self.msg_id and _ID.match(self.msg_id) else (f"seq-{self.seq}")
            )
        if not mapping.get("created_at"):
            mapping["created_at"] = self.stored_at()


def message_type_for(subject: str) -> type[Envelope]:
    """The message model a subject carries (``dlq.<role>.<subject>`` carries the
    original's)."""
    family, _, rest = subject.partition(".")
    if family == "dlq":  # dlq.<role>.<original subject>
        family = rest.partition(".")[2].partition(".")[0]
    try:
        return _TYPES[family]
    except KeyError:
        raise CodecError(
            f"no message type for subject {subject!r}",
            subject=subject,
            hint="see `rolebus subjects` for the subjects rolebus knows",
        ) from None


def encode(message: BaseModel) -> bytes:
    """A model as a msgpack map (unknown fields kept)."""
    return encode_map(message.model_dump(mode="json"))


def encode_map(data: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def decode_map(data: bytes, *, subject: str = "") -> dict[str, Any]:
    """Bytes to a map, or a CodecError that says what the bytes were."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types for bad bytes
        raise CodecError(
            f"message on {subject!r} is not msgpack ({len(data)} bytes, "
            f"starting {data[:16]!r}): {error or type(error).__name__}",
            subject=subject,
            hint="publish a msgpack map as described in subjects.md",
        ) from error
    if not isinstance(value, dict):
        raise CodecError(
            f"message on {subject!r} is a msgpack {type(value).__name__}, not a map",
            subject=subject,
            hint="publish a msgpack map as described in subjects.md",
        )
    return value


def validation_problems(error: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: what is wrong; ...``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or '(root)'}: {item['msg']}"
        for item in error.errors()
    )


def decode_as(
    model: type[MessageT], data: bytes, *, subject: str = "", origin: Origin | None = None
) -> MessageT:
    """Decode and validate against one model (``origin``: see :class:`Origin`)."""
    mapping = decode_map(data, subject=subject)
    if origin is not None and issubclass(model, Envelope):
        origin.fill(mapping)
    try:
        return model.model_validate(mapping)
    except ValidationError as error:
        problems = validation_problems(error)
        raise CodecError(
            f"message on {subject!r} is not a valid {model.__name__}: {problems}",
            subject=subject,
            hint=f"see the {model.__name__} fields in subjects.md",
            kind="invalid",
        ) from error


def disagreement(subject: str, message: Envelope) -> str | None:
    """What a message's body says that its subject does not (None when they agree).

    The subject is what permissions and consumers route on, so a body that names
    another kind, role or escalation would let a message past a boundary: such a
    message is refused, never read one way or the other."""
    tokens = subject.split(".")
    if len(tokens) < 3:
        return None
    checks: list[tuple[str, object, str]] = []
    if isinstance(message, Task) and tokens[0] == "task":
        checks = [("kind", message.kind, tokens[2])]
    elif isinstance(message, Handoff) and tokens[0] == "handoff":
        checks = [
            ("to_role", message.to_role, tokens[1]),
            ("contract", message.contract, tokens[2]),
        ]
    elif isinstance(message, Escalation) and tokens[0] == "escalation":
        checks = [("to_role", message.to_role, tokens[1]), ("reason", message.reason, tokens[2])]
    elif isinstance(message, Decision) and tokens[0] == "decision":
        checks = [
            ("to_role", message.to_role, tokens[1]),
            ("escalation_id", message.escalation_id, tokens[2]),
        ]
    for field, said, routed in checks:
        if said != routed:
            return f"its {field} is {said!r} but its subject {subject!r} says {routed!r}"
    if tokens[0] in SENT_FAMILIES and not _sender_agrees(tokens, message):
        sender = tokens[3] if len(tokens) == 4 else None
        where = f"its subject names {sender!r}" if sender else "its subject names no sender"
        return (
            f"its from_role is {message.from_role!r} but {where} "
            f"(a role sends on {'.'.join(tokens[:3])}.<its id>)"
        )
    return None


def _sender_agrees(tokens: list[str], message: Envelope) -> bool:
    """Whether the body's ``from_role`` is the subject's sender token. A climbed
    escalation is passed on by whoever took its timer or held it: its asker is
    checked against the escalation's record instead."""
    if isinstance(message, Escalation) and message.level > 0:
        return True
    return message.from_role == (tokens[3] if len(tokens) == 4 else None)


def decode(subject: str, data: bytes, *, origin: Origin | None = None) -> Envelope:
    """Decode a message by the family of the subject it arrived on."""
    return decode_as(message_type_for(subject), data, subject=subject, origin=origin)
