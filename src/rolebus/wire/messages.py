"""The typed messages of wire contract v1 (pure data, no I/O).

Every message is a msgpack map on the wire (see :mod:`rolebus.wire.codec` and
subjects.md). Fields a newer publisher adds and this version does not know are
kept (``extra="allow"``) and written back unchanged, so a message survives a
decode/encode round trip through an older worker.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

__all__ = [
    "EARLIEST",
    "EVENT_SCHEMA_VERSION",
    "LATEST",
    "MAX_COUNT",
    "MAX_DEPTH",
    "SCHEMA_VERSION",
    "Decision",
    "Envelope",
    "Escalation",
    "EscalationOption",
    "EscalationRequest",
    "Event",
    "FollowUp",
    "Handoff",
    "HandoffRequest",
    "Identifier",
    "Instant",
    "Outcome",
    "OutcomeStatus",
    "Task",
    "Usage",
    "as_utc",
    "check_value",
    "from_nanoseconds",
    "new_id",
    "utc_now",
]

SCHEMA_VERSION = 1
#: Events changed in version 2: a task's record is its event (subjects.md).
EVENT_SCHEMA_VERSION = 2
_ID = re.compile(r"^[A-Za-z0-9_\-]+$")

#: How deeply a payload may nest, checked wherever a message is built (by a
#: publisher, or by a worker decoding what another language sent): the same
#: limit on both sides, far below what the encoders and decoders refuse.
MAX_DEPTH = 64
#: The integers msgpack and every other language's client can carry.
_INT_RANGE = (-(2**63), 2**64 - 1)


def check_value(value: Any, *, what: str = "payload") -> Any:
    """``value`` if it can travel: nested at most ``MAX_DEPTH`` deep, integers in
    64 bits, floats finite (NaN and infinities have no JSON form)."""
    if not isinstance(value, dict | list | tuple):
        _check_scalar(value, what)
        return value
    # Every task's payload comes through here: strings, the common case, are
    # passed over by their exact type before anything slower is asked.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{what} nests deeper than {MAX_DEPTH} levels")
        for child in item.values() if isinstance(item, dict) else item:
            kind = type(child)
            if kind is str or kind is bool or child is None:
                continue
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
            else:
                _check_scalar(child, what)
    return value


def _check_scalar(item: Any, what: str) -> None:
    if isinstance(item, bool):
        return
    if isinstance(item, int) and not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
        raise ValueError(f"{what} holds the integer {item}, beyond 64 bits")
    if isinstance(item, float) and not math.isfinite(item):
        raise ValueError(f"{what} holds {item}, which JSON cannot carry")


def new_id() -> str:
    """A fresh message id: 16 hex digits (64 random bits), short enough to type."""
    return uuid.uuid4().hex[:16]


def utc_now() -> datetime:
    return datetime.now(UTC)


#: The epoch, in UTC: a delivery's time is an offset from it.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The times a message may carry (subjects.md): a time outside them is refused at
#: decode, so no reader ever computes with a year 9999 that overflows once shifted.
EARLIEST = _EPOCH
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC, inside [EARLIEST, LATEST). RFC 3339 without an offset is
    read as UTC rather than refused: other languages' clients often omit it."""
    try:
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        moment = None
    if moment is None or not EARLIEST <= moment < LATEST:
        raise ValueError(
            f"time {value.isoformat()} is out of range: give a UTC time from "
            f"{EARLIEST:%Y} to before {LATEST:%Y} (RFC 3339)"
        )
    return moment


#: The most any count in a message may say (far above any real one): a larger one is
#: refused at validation rather than carried into a ledger or an encoder.
MAX_COUNT = 10**12
#: A time every message field uses: UTC, in range (see :func:`as_utc`).
Instant = Annotated[datetime, AfterValidator(as_utc)]
#: An id that may stand in a subject token or a KV key (see subjects.md).
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_\-]+$")
]


def from_nanoseconds(nanoseconds: int) -> datetime:
    """A time in nanoseconds since the epoch, cut to microseconds the same way a
    ``Nats-Time-Stamp`` is (exactly: integer arithmetic, no float rounding), so every
    reader agrees. (Added to the epoch: ``fromtimestamp`` costs several times more,
    once for every message replay reads.)"""
    return _EPOCH + timedelta(microseconds=nanoseconds // 1000)


class Envelope(BaseModel):
    """Fields every message on the bus carries."""

    model_config = ConfigDict(extra="allow", frozen=True)
    #: The newest schema version of this message this rolebus reads.
    _newest: ClassVar[int] = SCHEMA_VERSION

    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=256)
    from_role: Identifier | None = None
    correlation_id: Identifier | None = None
    causation_id: Identifier | None = None
    created_at: Instant = Field(default_factory=utc_now)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > cls._newest:
            raise ValueError(
                f"schema_version {value} is newer than this rolebus understands "
                f"({cls._newest}): upgrade rolebus to read it"
            )
        return value

    @field_validator("id")
    @classmethod
    def _id_is_one_token(cls, value: str) -> str:
        # Ids appear in subjects (decision.<role>.<escalation id>) and KV keys.
        if not _ID.match(value):
            raise ValueError("an id is letters, digits, '_' and '-' only")
        return value

    @property
    def flow_id(self) -> str:
        """The root of this message's flow (its correlation id, or itself)."""
        return self.correlation_id or self.id


class Task(Envelope):
    """Work for the role that owns a domain: subject ``task.<domain>.<kind>``."""

    kind: str = Field(min_length=1)
    title: str
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    deadline: Instant | None = None
    #: How many tasks this one may still cause in its flow (set by the bus on a
    #: follow-up: a share of its cause's; None: the receiving role's own limit).
    flow_budget: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    #: The model tokens this task, with what it causes, may still spend in its flow
    #: (set like ``flow_budget``; None: the receiving role's own limit).
    flow_tokens: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    #: The US dollars likewise (None: the receiving role's own ``usd_per_flow``).
    flow_usd: float | None = Field(default=None, ge=0, le=MAX_COUNT)

    @field_validator("payload")
    @classmethod
    def _payload_travels(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_value(value)  # type: ignore[no-any-return]


class Handoff(Envelope):
    """An API contract version handed to a role (``handoff.<to_role>.<contract>``),
    or that role's answer flowing back to the sender (``status`` not ``offered``)."""

    to_role: str
    contract: str
    version: str
    status: Literal["offered", "accepted", "changes-requested"] = "offered"
    reasons: list[str] = Field(default_factory=list)
    task_id: str | None = None
    note: str = ""


class EscalationOption(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    tradeoffs: str = ""


class Escalation(Envelope):
    """A question or approval a role must decide: ``escalation.<to_role>.<reason>``.

    ``task_id`` is the task parked until the decision comes back; ``level`` counts
    how many times it climbed ``reports_to`` after a timeout.
    """

    to_role: str
    reason: str
    question: str
    task_id: str | None = None
    options: list[EscalationOption] = Field(default_factory=list)
    timeout_s: float | None = None
    level: int = 0


class Decision(Envelope):
    """The answer to an escalation, back to the asker: ``decision.<to_role>.<escalation_id>``."""

    escalation_id: str
    to_role: str
    decision: str
    approved: bool | None = None
    task_id: str | None = None
    decided_by: str = "person"


class Event(Envelope):
    """A lifecycle event: ``event.<entity>.<state>``; for tasks a record,
    ``event.task.<state>.<role>.<task id>``, or a note about a running attempt
    (subjects.md). A record carries ``record``: what the bus needs besides the
    event's fields to go on with the task (its outbox, its handler's answer)."""

    _newest: ClassVar[int] = EVENT_SCHEMA_VERSION
    schema_version: int = EVENT_SCHEMA_VERSION
    entity: str = "task"
    state: str
    task_id: str
    role: str | None = None
    subject: str | None = None
    attempt: int = 0
    at: Instant = Field(default_factory=utc_now)
    result: Any = None
    error: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    record: dict[str, Any] | None = None


# --- what a handler returns ---------------------------------------------------------


class FollowUp(BaseModel):
    """A follow-up task a handler asks the bus to publish."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str
    title: str
    kind: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("payload")
    @classmethod
    def _payload_travels(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_value(value)  # type: ignore[no-any-return]


class EscalationRequest(BaseModel):
    """A handler's question: to whom (or the role's ``escalate`` rule for ``reason``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str
    question: str
    to: str | None = None
    options: list[EscalationOption] = Field(default_factory=list)
    #: An approval (yes or no; no ends the task ``rejected``) rather than a question.
    approval: bool = False


class HandoffRequest(BaseModel):
    """A contract version a handler hands to another role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str
    contract: str
    version: str
    document: dict[str, Any] | None = None
    note: str = ""


class Usage(BaseModel):
    """What an answer cost: model calls, tokens and, where the price is known, US
    dollars (``cost_usd`` None: unknown). ``reused_calls`` were answered from the
    record of an earlier delivery: not paid again."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str
    calls: int = Field(default=0, ge=0, le=MAX_COUNT)
    reused_calls: int = Field(default=0, ge=0, le=MAX_COUNT)
    prompt_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    completion_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    cost_usd: float | None = Field(default=None, ge=0, le=MAX_COUNT)
    #: How the figures were checked: ``clamped`` (the server reported more than the
    #: request could cost, or less than nothing), ``estimated`` (it reported none).
    flags: list[str] = Field(default_factory=list)
    #: The model's time for these calls (a reused call counts its recorded time).
    latency_ms: float = Field(default=0.0, ge=0, le=MAX_COUNT)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, other: Usage) -> Usage:
        cost = (
            None
            if self.cost_usd is None and other.cost_usd is None
            else (self.cost_usd or 0.0) + (other.cost_usd or 0.0)
        )
        return Usage(
            model=self.model,
            calls=self.calls + other.calls,
            reused_calls=self.reused_calls + other.reused_calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=cost,
            flags=sorted({*self.flags, *other.flags}),
            latency_ms=self.latency_ms + other.latency_ms,
        )


OutcomeStatus = Literal["completed", "failed", "escalate", "handoff"]


class Outcome(BaseModel):
    """What a handler decided; the worker turns it into effects on the bus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: OutcomeStatus
    result: Any = None
    error: str | None = None
    retryable: bool = True
    tasks: list[FollowUp] = Field(default_factory=list)
    escalation: EscalationRequest | None = None
    handoff: HandoffRequest | None = None
    #: What reaching this answer cost (LLM roles; any handler may report it).
    usage: Usage | None = None

    @classmethod
    def completed(cls, result: Any = None, *, tasks: list[FollowUp] | None = None) -> Outcome:
        return cls(status="completed", result=result, tasks=tasks or [])

    @classmethod
    def failed(cls, error: str, *, retryable: bool = True) -> Outcome:
        return cls(status="failed", error=error, retryable=retryable)

    @classmethod
    def escalate(
        cls,
        reason: str,
        question: str,
        *,
        to: str | None = None,
        options: list[EscalationOption] | None = None,
        tasks: list[FollowUp] | None = None,
    ) -> Outcome:
        """Ask someone (``to``, else the role's ``escalate`` rule for ``reason``);
        "I don't know" is a valid question. The task parks until the decision."""
        request = EscalationRequest(reason=reason, question=question, to=to, options=options or [])
        return cls(status="escalate", escalation=request, tasks=tasks or [])

    @classmethod
    def hand_off(
        cls,
        to: str,
        contract: str,
        version: str,
        *,
        document: dict[str, Any] | None = None,
        note: str = "",
        result: Any = None,
        tasks: list[FollowUp] | None = None,
    ) -> Outcome:
        """Hand a contract version to another role (it reviews and answers).
        (``hand_off``, since ``handoff`` is the field it fills.)"""
        request = HandoffRequest(
            to=to, contract=contract, version=version, document=document, note=note
        )
        return cls(status="handoff", handoff=request, result=result, tasks=tasks or [])
