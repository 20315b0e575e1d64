"""Every wire name rolebus uses: subjects, streams, consumers, KV buckets, headers.

subjects.md documents each of these for publishers in other languages, and
``tests/test_subjects_doc.py`` fails when the two disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from rolebus.errors import SubjectError

__all__ = [
    "BUDGETS_BUCKET",
    "CALLS_BUCKET",
    "CANCELS_BUCKET",
    "CONTRACTS_BUCKET",
    "DLQ_STREAM",
    "ESCALATIONS_BUCKET",
    "EVENTS_STREAM",
    "LIMITS_BUCKET",
    "PARTS_BUCKET",
    "SENT_FAMILIES",
    "STREAMS",
    "SUPERVISOR_CONSUMER",
    "TASK_RECORDS",
    "TIMERS_STREAM",
    "WORK_STREAM",
    "ParsedSubject",
    "StreamSpec",
    "consumer_name",
    "decision_subject",
    "dlq_subject",
    "escalation_subject",
    "event_subject",
    "group_commit_stream",
    "handoff_subject",
    "is_record",
    "is_task_event",
    "key_reader_api_subjects",
    "last_try_subject",
    "note_subject",
    "parse_dlq_subject",
    "parse_subject",
    "reader_api_subjects",
    "record_subject",
    "records_of",
    "role_filter_subjects",
    "sender_of",
    "stream_for_subject",
    "stream_holding",
    "task_subject",
    "timer_subjects",
    "validate_pattern",
    "validate_token",
    "with_sender",
    "with_senders",
]

# --- message families (the first token of a subject) --------------------------------
TASK: Final = "task"
HANDOFF: Final = "handoff"
ESCALATION: Final = "escalation"
DECISION: Final = "decision"
EVENT: Final = "event"
DLQ: Final = "dlq"
TIMER: Final = "timer"

# --- streams ---------------------------------------------------------------------------
WORK_STREAM: Final = "ROLEBUS_WORK"
EVENTS_STREAM: Final = "ROLEBUS_EVENTS"
DLQ_STREAM: Final = "ROLEBUS_DLQ"
TIMERS_STREAM: Final = "ROLEBUS_TIMERS"


@dataclass(frozen=True)
class StreamSpec:
    """A stream rolebus provisions. ``work`` streams refuse new messages when full."""

    name: str
    subjects: tuple[str, ...]
    description: str
    work: bool
    schedules: bool = False


STREAMS: Final = (
    StreamSpec(
        WORK_STREAM,
        (f"{TASK}.>", f"{HANDOFF}.>", f"{ESCALATION}.>", f"{DECISION}.>"),
        "tasks, contract handoffs, escalations and decisions between role workers",
        work=True,
    ),
    StreamSpec(EVENTS_STREAM, (f"{EVENT}.>",), "lifecycle events: the history", work=False),
    StreamSpec(DLQ_STREAM, (f"{DLQ}.>",), "dead letters, with reason headers", work=True),
    # Message schedules cannot live in a discard-new stream, hence their own stream.
    StreamSpec(
        TIMERS_STREAM,
        (f"{TIMER}.>",),
        "escalation timeouts: scheduled messages the server fires at their deadline",
        work=False,
        schedules=True,
    ),
)

#: The durable consumer that turns fired timers into climbed escalations.
SUPERVISOR_CONSUMER: Final = "supervisor"

# --- KV buckets ------------------------------------------------------------------------
CONTRACTS_BUCKET: Final = "rolebus_contracts"
ESCALATIONS_BUCKET: Final = "rolebus_escalations"
CALLS_BUCKET: Final = "rolebus_llm_calls"
#: The parts of recorded calls, by content hash (see flows/calls.py and subjects.md).
PARTS_BUCKET: Final = "rolebus_llm_parts"
BUDGETS_BUCKET: Final = "rolebus_budgets"
CANCELS_BUCKET: Final = "rolebus_cancels"
LIMITS_BUCKET: Final = "rolebus_limits"
BUCKETS: Final = (
    CONTRACTS_BUCKET,
    ESCALATIONS_BUCKET,
    CALLS_BUCKET,
    PARTS_BUCKET,
    BUDGETS_BUCKET,
    CANCELS_BUCKET,
    LIMITS_BUCKET,
)


_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_ROLE_ID = re.compile(r"^[a-z][a-z0-9\-]*$")


def validate_token(value: str, *, what: str) -> str:
    """One subject token: letters, digits, ``_`` and ``-``; nothing else (ids are
    tokens too, and KV keys, which allow no more)."""
    if not value or not _TOKEN.match(value):
        raise SubjectError(
            f"{what} {value!r} is not a valid subject token",
            subject=value,
            hint="use letters, digits, '_' or '-' only: no spaces, dots, '*' or '>'",
        )
    return value


def validate_role_id(value: str) -> str:
    if not _ROLE_ID.match(value):
        raise SubjectError(
            f"role id {value!r} is not valid",
            subject=value,
            hint="use lowercase letters, digits and '-', starting with a letter (e.g. eng-be)",
        )
    return value


def validate_pattern(pattern: str) -> str:
    """A subscription pattern: tokens, ``*`` for one token, ``>`` only at the end."""
    tokens = pattern.split(".")
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == len(tokens) - 1):
            continue
        validate_token(token, what=f"token {index + 1} of pattern {pattern!r}:")
    return pattern


def reader_api_subjects(stream: str) -> list[str]:
    """The JetStream API subjects a reader of ``stream`` needs, the one list both the
    code (which reads through them) and ``rolebus auth`` (which grants them) follow:
    its info, a message by sequence or subject (direct get, and the plain get for a
    stream made without direct get), and the named ephemeral consumers of a scan."""
    api = "$JS.API"
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
    ]


def key_reader_api_subjects(bucket: str, keys: str) -> list[str]:
    """What a reader of only some keys of a bucket needs (``keys``, a pattern): the
    bucket's info and a direct get of those keys, which names the key it reads
    (``KeyValue.get`` reads through it; no scan)."""
    api = "$JS.API"
    return [f"{api}.STREAM.INFO.KV_{bucket}", f"{api}.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{keys}"]


def stream_holding(pattern: str) -> str | None:
    """The stream that stores the subjects ``pattern`` matches, from its first token
    (``task.backend.*`` -> ROLEBUS_WORK); None when that token is a wildcard or no
    stream stores it."""
    family = pattern.split(".", 1)[0]
    for spec in STREAMS:
        if any(subject.split(".", 1)[0] == family for subject in spec.subjects):
            return spec.name
    return None


#: The families whose subjects may carry a fourth token, the sending role:
#: ``task.<domain>.<kind>.<sender>``. Permissions let a role's user publish only
#: under its own id there, so who sent a message is where the server let it land;
#: three tokens say it came from outside the team (a person, a script).
SENT_FAMILIES: Final = (TASK, HANDOFF, ESCALATION, DECISION)


def _sent(subject: str, sender: str | None) -> str:
    return subject if sender is None else f"{subject}.{validate_token(sender, what='sender')}"


def task_subject(domain: str, kind: str, *, sender: str | None = None) -> str:
    return _sent(
        f"{TASK}.{validate_token(domain, what='domain')}.{validate_token(kind, what='kind')}",
        sender,
    )


def handoff_subject(to_role: str, contract: str, *, sender: str | None = None) -> str:
    return _sent(
        f"{HANDOFF}.{validate_role_id(to_role)}.{validate_token(contract, what='contract')}",
        sender,
    )


def escalation_subject(to_role: str, reason: str, *, sender: str | None = None) -> str:
    return _sent(
        f"{ESCALATION}.{validate_role_id(to_role)}.{validate_token(reason, what='reason')}",
        sender,
    )


def decision_subject(to_role: str, escalation_id: str, *, sender: str | None = None) -> str:
    return _sent(
        f"{DECISION}.{validate_role_id(to_role)}."
        f"{validate_token(escalation_id, what='escalation id')}",
        sender,
    )


def sender_of(subject: str) -> str | None:
    """The role that sent a task, handoff, escalation or decision: its subject's
    fourth token (None: sent from outside the team)."""
    tokens = subject.split(".")
    return tokens[3] if len(tokens) == 4 and tokens[0] in SENT_FAMILIES else None


def with_senders(pattern: str) -> list[str]:
    """The filters that match what ``pattern`` names whoever sent it: a three-token
    pattern of a family that carries a sender (``task.backend.*``) or a writer
    (``event.escalation.*``) also matches the same subjects with one
    (``task.backend.*.*``)."""
    tokens = pattern.split(".")
    if len(tokens) == 3 and tokens[0] in (*SENT_FAMILIES, EVENT) and tokens[2] != ">":
        return [pattern, f"{pattern}.*"]
    return [pattern]


def with_sender(subject: str, sender: str | None) -> str:
    """``subject`` as ``sender`` publishes it: its sender token added to a
    three-token subject of a family that carries one; anything else unchanged."""
    tokens = subject.split(".")
    if sender is None or len(tokens) != 3 or tokens[0] not in SENT_FAMILIES:
        return subject
    return _sent(subject, sender)


def event_subject(entity: str, state: str, *, writer: str | None = None) -> str:
    """``event.<entity>.<state>``; a role writes its handoff and escalation events
    under its own token, ``event.<entity>.<state>.<writer>``."""
    subject = (
        f"{EVENT}.{validate_token(entity, what='entity')}.{validate_token(state, what='state')}"
    )
    return subject if writer is None else f"{subject}.{validate_token(writer, what='writer')}"


#: Every task record (``event.task.<state>.<role>.<task id>``) and no note.
TASK_RECORDS: Final = f"{EVENT}.task.*.*.*"


def record_subject(state: str, role: str, task_id: str) -> str:
    """Where a task's record is appended: one subject per task, state and role.
    (Not validated here: the state is one of ours, the role id and the task id
    were validated when they were read; this is on every task's path.)"""
    return f"{EVENT}.task.{state}.{role}.{task_id}"


def records_of(task_id: str, role: str = "*") -> str:
    """The subjects of one task's records: its history under ``role`` (the
    compare-and-set's scope), or under any role."""
    return f"{EVENT}.task.*.{role}.{task_id}"


def note_subject(state: str, role: str, task_id: str, number: str) -> str:
    """Where a note about a running attempt goes (claimed, progress): six tokens,
    outside the records' compare-and-set, so that a note never moves it."""
    return f"{EVENT}.task.{state}.{role}.{task_id}.{number}"


def last_try_subject(role: str, task_id: str, stream_seq: int | str) -> str:
    """The note that keeps a message before its last allowed attempt, found by its
    place in the work stream (``stream_seq``; ``*`` for the task id when only the
    place is known)."""
    return note_subject("last-try", role, task_id, str(stream_seq))


def is_record(subject: str) -> bool:
    """True for a task record's subject (five tokens), false for a note or another
    entity's event."""
    return subject.startswith("event.task.") and subject.count(".") == 4


def is_task_event(subject: str) -> bool:
    """True for a task's record or note: its fourth token is the task's role."""
    return subject.startswith("event.task.") and subject.count(".") in (4, 5)


def timer_subjects(escalation_id: str, level: int) -> tuple[str, str]:
    """Where one escalation level's timer waits (a NATS scheduled message), and
    the subject the server publishes it on at the deadline."""
    token = f"{validate_token(escalation_id, what='escalation id')}-l{level}"
    return f"{TIMER}.schedule.{token}", f"{TIMER}.fired.{token}"


def dlq_subject(role: str, original_subject: str) -> str:
    """Where ``role`` dead-letters a message: under its own token, so that whose
    dead letter it is comes from where the server let it land, not a header."""
    return f"{DLQ}.{role}.{original_subject}"


def parse_dlq_subject(subject: str) -> tuple[str, str]:
    """``(role, original subject)`` of a dead letter's subject."""
    _, role, original = subject.split(".", 2) if subject.count(".") >= 2 else ("", "", "")
    if not role or not original:
        raise SubjectError(
            f"{subject!r} is not a dead letter's subject (dlq.<role>.<original subject>)",
            subject=subject,
        )
    return role, original


def consumer_name(role_id: str) -> str:
    """The durable pull consumer all replicas of one role share."""
    return f"worker-{validate_role_id(role_id)}"


def role_filter_subjects(role_id: str, domains: tuple[str, ...] | list[str]) -> list[str]:
    """Everything addressed to a role: its domains' tasks and its handoffs,
    escalations and decisions."""
    return [f"{TASK}.{domain}.>" for domain in domains] + [
        f"{HANDOFF}.{role_id}.>",
        f"{ESCALATION}.{role_id}.>",
        f"{DECISION}.{role_id}.>",
    ]


@dataclass(frozen=True)
class ParsedSubject:
    family: str
    second: str
    third: str
    #: The sending (or, for an event, writing) role: a fourth token; None from
    #: outside the team.
    sender: str | None = None

    @property
    def subject(self) -> str:
        return _sent(f"{self.family}.{self.second}.{self.third}", self.sender)


_THREE_TOKEN_FAMILIES = (TASK, HANDOFF, ESCALATION, DECISION, EVENT)


def _task_event(tokens: list[str]) -> bool:
    return tokens[0] == EVENT and len(tokens) > 1 and tokens[1] == "task"


def parse_subject(subject: str) -> ParsedSubject:
    """Split and validate a publishable subject (``family.second.third``)."""
    tokens = subject.split(".")
    if tokens[0] not in _THREE_TOKEN_FAMILIES:
        raise SubjectError(
            f"unknown subject {subject!r}",
            subject=subject,
            hint="subjects start with task., handoff., escalation., decision. or event.; "
            "see `rolebus subjects`",
        )
    if _task_event(tokens) and len(tokens) in (5, 6):
        # A task's record or note: event.task.<state>.<role>.<task id>[.<attempt key>]
        names = ("entity", "state", "role", "task id", "key")[: len(tokens) - 1]
        for token, name in zip(tokens[1:], names, strict=True):
            validate_token(token, what=f"{name} in {subject!r}:")
        return ParsedSubject(tokens[0], tokens[1], tokens[2])
    if len(tokens) not in (3, 4):
        fourth = "sender" if tokens[0] in SENT_FAMILIES else "writer"
        raise SubjectError(
            f"subject {subject!r} has {len(tokens)} tokens; {tokens[0]} subjects have 3, "
            f"or 4 with the {fourth} ({tokens[0]}.<...>.<...>[.<{fourth}>])",
            subject=subject,
            hint="e.g. task.backend.implement; see `rolebus subjects`",
        )
    family, second, third = tokens[:3]
    if len(tokens) == 4:
        validate_token(tokens[3], what=f"sender or writer in {subject!r}:")
    names = {
        TASK: ("domain", "kind"),
        HANDOFF: ("role", "contract"),
        ESCALATION: ("role", "reason"),
        DECISION: ("role", "escalation id"),
        EVENT: ("entity", "state"),
    }[family]
    validate_token(second, what=f"{names[0]} in {subject!r}:")
    validate_token(third, what=f"{names[1]} in {subject!r}:")
    return ParsedSubject(family, second, third, tokens[3] if len(tokens) == 4 else None)


_GROUP_COMMIT_FAMILIES: Final = {
    TASK: WORK_STREAM,
    HANDOFF: WORK_STREAM,
    ESCALATION: WORK_STREAM,
    DECISION: WORK_STREAM,
    EVENT: EVENTS_STREAM,
    DLQ: DLQ_STREAM,
}


def group_commit_stream(subject: str) -> str | None:
    """The stream whose messages on ``subject`` may share an atomic batch, or None
    (timers: scheduled messages are not batched)."""
    return _GROUP_COMMIT_FAMILIES.get(subject.split(".", 1)[0])


def stream_for_subject(subject: str) -> str:
    family = subject.split(".", 1)[0]
    if family == EVENT:
        return EVENTS_STREAM
    if family == DLQ:
        return DLQ_STREAM
    if family == TIMER:
        return TIMERS_STREAM
    parse_subject(subject)
    return WORK_STREAM
