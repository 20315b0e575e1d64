"""The task lifecycle: every rule of a task's life, in one table and one pure function.

Read :data:`TABLE` top to bottom: for each stage a task can be in (its newest
record's state, or ``new``), what each input does: one row per input, ignored inputs
included. The rules themselves are :mod:`rolebus.flows.rules`, each typed by its
input; :func:`step` takes the task's newest record and one input and returns the
:class:`~rolebus.flows.actions.Transition`: the record to append (one conditional
write) and the actions, as data, for the worker to carry out (run the handler,
publish the record's outbox, ack, nak with a delay, dead-letter). No I/O, no clock, no
randomness: time and ids come in with the input, so every row is a unit test, and the
state diagram (``rolebus lifecycle``, docs/lifecycle.svg) is drawn from this table.

What reaches :func:`step` is made by :mod:`rolebus.flows.intake` (what arrived) and
:mod:`rolebus.flows.answers` (what a handler answered). A lost compare-and-set is
answered by reading the record again and stepping again with the same input: the
rules decide what a newer record means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from rolebus.flows import rules
from rolebus.flows.actions import Transition
from rolebus.flows.inputs import (
    Answer,
    Breach,
    Cancelled,
    Completed,
    Decided,
    Delivered,
    Escalated,
    Failed,
    GaveUp,
    HandedOver,
    Input,
    Invalid,
    OutboxStored,
    OutboxStuck,
    Refused,
    Stale,
)
from rolebus.flows.record import State, TaskState

__all__ = ["STAGES", "TABLE", "Rows", "Rule", "rows", "rule_for", "stage_of", "step", "witness"]


@dataclass(frozen=True)
class Rule:
    """One row: what an input does to a task in a stage (``apply`` is one of
    :mod:`rolebus.flows.rules`, typed by the input its rows give it)."""

    apply: Callable[[Any, Any], Transition] = field(repr=False)
    does: str
    #: The stages it can lead to (the diagram's arrows); empty: the stage stays.
    leads_to: tuple[State, ...] = ()
    #: The outcomes the rule can reach from this row (Transition.rule).
    outcomes: tuple[str, ...] = ()


Rows = Mapping[type, Rule]

_S = State

# --- rows shared by several stages -------------------------------------------------------

_BURY = Rule(rules.bury, "dead-letter with the reason; the record says dead", (_S.DEAD,), ("bury",))
_BURY_ENDED = Rule(
    rules.bury, "dead-letter with the reason; the record stays as it ended", (), ("bury-ended",)
)
_IGNORE = Rule(rules.ignore, "out of date: changes nothing, ack", (), ("ignore",))
_AGAIN = Rule(
    rules.again, "done before: its outbox again, ack; the handler does not run", (), ("again",)
)
_WAIT = Rule(
    rules.again, "parked: only its own decision runs it; its outbox again, ack", (), ("again",)
)
_ANOTHER_PARKED = Rule(
    rules.again, "another delivery parked it meanwhile: its outbox again, ack", (), ("again",)
)
_ILLEGAL = Rule(
    rules.illegal,
    "illegal: an answer with no claim; nothing written, delivered again",
    (),
    ("illegal",),
)
_CLAIM = Rule(
    rules.claim,
    "claims it: asks its boundary, or ends cancelled, or runs the handler",
    (_S.CLAIMED, _S.CANCELLED),
    ("ask", "cancel", "run"),
)
_DECISION = Rule(
    rules.resume,
    "its decision: approved or answered resumes, refused rejects; another is ignored",
    (_S.RESUMED, _S.REJECTED, _S.CANCELLED, _S.DEAD),
    ("resume", "reject", "cancel", "ignore", "bury"),
)
_DECISION_AGAIN = Rule(
    rules.resume,
    "its decision again (a resumed attempt that failed retries): resumes; another is ignored",
    (_S.RESUMED, _S.REJECTED, _S.CANCELLED, _S.DEAD),
    ("resume", "reject", "cancel", "ignore", "bury"),
)


def _ends(state: State) -> Rule:
    return Rule(rules.end, f"ends {state}: record, outbox, ack", (state,), ("end", "restart"))


_PARK = Rule(
    rules.park,
    "parks behind the escalation: record, outbox, ack",
    (_S.PARKED,),
    ("park", "restart"),
)
_PARK_FOR_BUS = Rule(
    rules.park,
    "parks for the approval the bus asked: record, outbox, ack",
    (_S.PARKED,),
    ("park", "restart"),
)
_FAIL = Rule(
    rules.fail,
    "retries with backoff while attempts remain, else dead-letters",
    (_S.RETRYING, _S.DEAD),
    ("retry", "bury"),
)
_STUCK = Rule(
    rules.outbox_stuck,
    "its outbox could not be stored: the record says so, the delivery comes again",
    (),
    ("stuck", "still-stuck"),
)
_STORED = Rule(
    rules.outbox_stored, "its stuck outbox is stored: the record says so, ack", (), ("unstuck",)
)
_NEWER = Rule(
    rules.give_back,
    "an outbox note meets a newer record: the delivery comes again",
    (),
    ("give-back",),
)

#: What a handler's answers do where the task may run (or was resumed).
_ANSWERS: Final[Rows] = {
    Completed: _ends(_S.COMPLETED),
    HandedOver: _ends(_S.HANDED_OFF),
    Refused: _ends(_S.REJECTED),
    Cancelled: _ends(_S.CANCELLED),
    Escalated: _PARK,
    Breach: _PARK_FOR_BUS,
    Failed: _FAIL,
}

# --- the table ---------------------------------------------------------------------------

#: No record yet under this role: a first delivery claims it.
NEW: Final[Rows] = {
    Delivered: _CLAIM,
    Decided: Rule(
        rules.orphan_decision,
        "a decision for a task with no record: dead-letter",
        (_S.DEAD,),
        ("bury",),
    ),
    Completed: _ILLEGAL,
    HandedOver: _ILLEGAL,
    Refused: _ILLEGAL,
    Cancelled: _ILLEGAL,
    Escalated: _ILLEGAL,
    Breach: _ILLEGAL,
    Failed: _ILLEGAL,
    Invalid: _BURY,
    GaveUp: _BURY,
    Stale: _IGNORE,
    OutboxStuck: _ILLEGAL,
    OutboxStored: _ILLEGAL,
}

#: Claimed, retrying or redriven: a delivery runs it; the handler's answer decides.
RUNNABLE: Final[Rows] = {
    Delivered: _CLAIM,
    Decided: _DECISION_AGAIN,
    **_ANSWERS,
    Invalid: _BURY,
    GaveUp: _BURY,
    Stale: _IGNORE,
    OutboxStuck: _NEWER,
    OutboxStored: _NEWER,
}

#: Parked behind an escalation: only its own decision runs it.
PARKED: Final[Rows] = {
    Delivered: _WAIT,
    Decided: _DECISION,
    Completed: _ANOTHER_PARKED,
    HandedOver: _ANOTHER_PARKED,
    Refused: _ANOTHER_PARKED,
    Cancelled: _ANOTHER_PARKED,
    Escalated: _ANOTHER_PARKED,
    Breach: _ANOTHER_PARKED,
    Failed: _ANOTHER_PARKED,
    Invalid: _BURY,
    GaveUp: _BURY,
    Stale: _IGNORE,
    OutboxStuck: _STUCK,
    OutboxStored: _STORED,
}

#: Resumed by its decision: that decision's attempt runs, and its answer decides.
RESUMED: Final[Rows] = {
    Delivered: _WAIT,
    Decided: _DECISION,
    **_ANSWERS,
    Invalid: _BURY,
    GaveUp: _BURY,
    Stale: _IGNORE,
    OutboxStuck: _STUCK,
    OutboxStored: _STORED,
}

#: Finished: it never runs again, and its record never changes state.
ENDED: Final[Rows] = {
    Delivered: _AGAIN,
    Decided: _AGAIN,
    Completed: _AGAIN,
    HandedOver: _AGAIN,
    Refused: _AGAIN,
    Cancelled: _AGAIN,
    Escalated: _AGAIN,
    Breach: _AGAIN,
    Failed: _AGAIN,
    Invalid: _BURY_ENDED,
    GaveUp: _BURY_ENDED,
    Stale: _IGNORE,
    OutboxStuck: _STUCK,
    OutboxStored: _STORED,
}

#: Every stage and its rows, in the order the diagram draws them.
TABLE: Final[Mapping[State, Rows]] = {
    _S.NEW: NEW,
    _S.CLAIMED: RUNNABLE,
    _S.RETRYING: RUNNABLE,
    _S.REDRIVEN: RUNNABLE,
    _S.PARKED: PARKED,
    _S.RESUMED: RESUMED,
    _S.COMPLETED: ENDED,
    _S.HANDED_OFF: ENDED,
    _S.REJECTED: ENDED,
    _S.CANCELLED: ENDED,
    _S.DEAD: ENDED,
}
#: Every stage, in table order.
STAGES: Final = tuple(TABLE)


def stage_of(record: TaskState | None) -> State:
    """The stage a record puts its task in (a state this rolebus does not know is
    read as finished: nothing runs it)."""
    if record is None:
        return State.NEW
    try:
        return State(record.state)
    except ValueError:
        return State.DEAD


def rule_for(stage: State | str, kind: type) -> Rule:
    return TABLE[State(stage)][kind]


def rows() -> Iterator[tuple[State, type, Rule]]:
    """Every (stage, input, rule), in table order."""
    for stage, stage_rows in TABLE.items():
        for kind, rule in stage_rows.items():
            yield stage, kind, rule


#: Who is told of every transition (a test's coverage recorder; None in production).
_witness: Callable[[State, type, str], None] | None = None


def witness(recorder: Callable[[State, type, str], None] | None) -> None:
    """Have ``recorder(stage, input type, outcome)`` told of every step (the test
    suite's transition coverage); None stops it."""
    global _witness
    _witness = recorder


def step(record: TaskState | None, given: Input) -> Transition:
    """What ``given`` does to the task whose newest record is ``record`` (None: it
    has none under this role). Pure: the same arguments give the same transition.

    Before the table, one rule holds in every stage: a delivery (or its answer) whose
    subject is not the record's is another message that took the same task id first
    (the subject names its sender): it is dead-lettered as ``id-taken``, never taken
    for a redelivery of work already done."""
    stage = stage_of(record)
    transition = _taken(record, given)
    if transition is None:
        transition = TABLE[stage][type(given)].apply(record, given)
    if _witness is not None:
        _witness(stage, type(given), transition.rule)
    return transition


def _taken(record: TaskState | None, given: Input) -> Transition | None:
    if record is None or not record.subject:
        return None
    if isinstance(given, Delivered):
        subject, attempt = given.claim.subject, given.claim.attempt
    elif isinstance(given, Answer):
        subject, attempt = given.subject or record.subject, given.attempt
    else:
        return None
    if subject == record.subject:
        return None
    return rules.id_taken(record, subject, attempt)
