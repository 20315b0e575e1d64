"""The task lifecycle: every rule of a task's life, in one table and one pure function.

Everything that decides what happens to a task lives in this file (the rule h11 keeps
for its state machine): the states, the inputs that can reach a task, and
:func:`step`, which takes the task's newest record and one input and returns a
:class:`Transition` — the record to append (one conditional write) and the actions,
as data, for the worker to carry out (run the handler, publish the record's outbox,
ack, nak with a delay, dead-letter). No I/O, no clock, no randomness: time and ids
come in with the input, so every row of :data:`TABLE` is a unit test, and the state
diagram (``rolebus lifecycle``, docs/lifecycle.svg) is drawn from the same table.

What the worker prepares before it steps (it needs I/O, or the team): the record a
claim starts from, the follow-ups an outcome sends (numbered from the record's
count), an escalation opened in its store. What it does after: exactly the actions,
in order. A lost compare-and-set is answered by reading the record again and
stepping again with the same input: the rules decide what a newer record means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from rolebus.flows.actions import (
    Ack,
    Action,
    AskBoundary,
    DeadLetter,
    GrantBudget,
    Ignore,
    KeepLastTry,
    Nak,
    Publish,
    Restart,
    Run,
    Transition,
)
from rolebus.flows.inputs import (
    Answer,
    Breach,
    Cancelled,
    Completed,
    Decided,
    Delivered,
    Ending,
    Escalated,
    Failed,
    GaveUp,
    HandedOver,
    Input,
    Invalid,
    Refused,
    Stale,
)
from rolebus.flows.record import PARKED, RESUMED, TERMINAL_STATES, TaskState
from rolebus.team.authority import BRAKE_REASON
from rolebus.team.budget import BUDGET_REASON

__all__ = ["ENDINGS", "STAGES", "TABLE", "Rule", "stage_of", "step"]

#: Not a record's state: the task has no record under this role yet.
NEW: Final = "new"
CLAIMED: Final = "claimed"  # running: its handler has it (never stored alone)
RETRYING: Final = "retrying"
REDRIVEN: Final = "redriven"
COMPLETED: Final = "completed"
HANDED_OFF: Final = "handed-off"
REJECTED: Final = "rejected"
CANCELLED: Final = "cancelled"
DEAD: Final = "dead"
#: Every stage a task can be in, in the order the diagram draws them.
STAGES: Final = (
    NEW,
    CLAIMED,
    RETRYING,
    REDRIVEN,
    PARKED,
    RESUMED,
    COMPLETED,
    HANDED_OFF,
    REJECTED,
    CANCELLED,
    DEAD,
)
#: The stages in which a task may run (claimed by this delivery, or about to be).
_RUNNABLE = frozenset({NEW, CLAIMED, RETRYING, REDRIVEN})


#: The answers that end a task, and the state each ends it in.
ENDINGS: Final[Mapping[type[Ending], str]] = {
    Completed: COMPLETED,
    HandedOver: HANDED_OFF,
    Refused: REJECTED,
    Cancelled: CANCELLED,
}


#: The actions most transitions end with (built once: they carry nothing).
_OUTBOX_THEN_ACK: Final[tuple[Action, ...]] = (Publish(), Ack())
_RUN: Final[tuple[Action, ...]] = (Run(),)


def stage_of(record: TaskState | None) -> str:
    return NEW if record is None else record.state


# --- the rules --------------------------------------------------------------------------


def _changed(record: TaskState, now: datetime, answer: Answer | None, **changes: Any) -> TaskState:
    """``record`` with ``changes``: an answer's outcome is carried by every record
    after it (its usage is reported by the first one that stores it)."""
    if answer is not None and answer.outcome is not None:
        changes = {"outcome": dict(answer.outcome), "usage_reported": False, **changes}
    return record.model_copy(update={**changes, "updated_at": now})


def _again(record: TaskState | None, _input: Input) -> Transition:
    """Done before (or parked): its outbox again (the same Msg-Ids), then ack; the
    handler does not run twice."""
    last_try = isinstance(_input, Delivered | Decided) and _input.last_try and record is not None
    before: tuple[Action, ...] = (KeepLastTry(record.task_id),) if last_try and record else ()
    return Transition(record, before=before, after=_OUTBOX_THEN_ACK, rule="again")


def _claim(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Delivered)
    claimed = given.claim
    if record is not None:
        # Decisions, escalations and a parked task's input survive a new attempt.
        detail = {key: value for key, value in record.detail.items() if key != "delay_s"}
        claimed = claimed.model_copy(update={"detail": detail, "source": record.source})
    before: tuple[Action, ...] = (KeepLastTry(claimed.task_id),) if given.last_try else ()
    if given.boundary is not None and not claimed.detail.get("approved_by"):
        return Transition(claimed, before=before, after=(AskBoundary(given.boundary),), rule="ask")
    if given.cancelled is not None:
        ending = Cancelled(
            now=given.now, attempt=claimed.attempt, error=f"cancelled: {given.cancelled}"
        )
        ended = _end(claimed, ending)
        return Transition(ended.record, True, before, ended.after, rule="cancel")
    return Transition(claimed, before=before, after=_RUN, rule="run")


def _resume(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Decided)
    assert record is not None
    if record.waiting_for != given.escalation_id:
        return _ignore(
            record, Stale(why=f"task {record.task_id} is not waiting for {given.escalation_id}")
        )
    if record.source is None:
        return _bury(
            record,
            Invalid(
                orphan=given.orphan,
                reason="invalid",
                error=f"task {record.task_id} was parked without its input (rolebus < 0.2?)",
                attempt=given.attempt,
                stream_seq=record.stream_seq,
                now=given.now,
            ),
        )
    before: tuple[Action, ...] = (KeepLastTry(record.task_id),) if given.last_try else ()
    kept = [
        d for d in record.detail.get("decisions", []) if d.get("id") != given.decision.get("id")
    ]
    detail: dict[str, Any] = {
        **{key: value for key, value in record.detail.items() if key != "delay_s"},
        "decisions": [*kept, dict(given.decision)],
    }
    # A new attempt starts: what the last one answered is not this one's.
    fresh = {"attempt": given.attempt, "started_at": given.now, "result": None, "error": None}
    fresh |= {"outcome": None, "effects": [], "usage_reported": False}

    def end_as(ending: type[Refused | Cancelled], error: str, rule: str) -> Transition:
        answer = ending(now=given.now, attempt=given.attempt, error=error, detail=detail)
        ended = _end(_changed(record, given.now, None, **fresh), answer)
        return Transition(ended.record, True, before, ended.after, rule=rule)

    if given.approval and given.approved is False:
        return end_as(Refused, f"not approved by {given.decided_by}: {given.text}", "reject")
    if given.approval:
        detail["approved_by"] = given.decided_by
        if given.reason == BUDGET_REASON:
            before = (*before, GrantBudget(given.escalation_id))
        elif given.reason == BRAKE_REASON:
            detail["brakes_approved"] = int(detail.get("brakes_approved", 0)) + 1
    if given.cancelled is not None:
        return end_as(Cancelled, f"cancelled: {given.cancelled}", "cancel")
    # The `resumed` record says which decision runs the task (and keeps it).
    resumed = _changed(record, given.now, None, state=RESUMED, detail=detail, **fresh)
    return Transition(resumed, True, before, _RUN, rule="resume")


def _orphan_decision(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Decided)
    return _bury(
        record,
        Invalid(
            orphan=given.orphan,
            reason="invalid",
            error=f"no parked task {given.orphan.task_id!r} for this decision",
            attempt=given.attempt,
            stream_seq=given.orphan.stream_seq,
            now=given.now,
        ),
    )


def _renumbered(record: TaskState, answer: Answer) -> Transition | None:
    """An answer whose messages were numbered from another count than the record's:
    a newer record was written meanwhile (a redriven or re-published task with
    history, met by a first delivery that did not read): start again."""
    if answer.numbered_from is None or answer.numbered_from == record.sent:
        return None
    return Transition(
        record,
        after=(Restart(f"task {record.task_id} has a record this attempt did not read"),),
        rule="restart",
    )


def _end(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Ending)
    assert record is not None
    if (restart := _renumbered(record, given)) is not None:
        return restart
    detail = dict(given.detail if given.detail is not None else record.detail)
    detail.pop("waiting_for", None)
    if given.sent is not None:
        detail["sent"] = given.sent
    ended = _changed(
        record,
        given.now,
        given,
        state=ENDINGS[type(given)],
        result=given.result,
        error=given.error,
        effects=list(given.effects),
        attempt=given.attempt,
        detail=detail,
        source=None,  # a finished task is resumed by nothing
    )
    return Transition(ended, True, after=_OUTBOX_THEN_ACK, rule="end")


def _park(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Escalated)
    assert record is not None
    if (restart := _renumbered(record, given)) is not None:
        return restart
    detail = {
        **record.detail,
        "waiting_for": given.escalation_id,
        "sent": given.sent,
        "escalated_to": given.to,
        "reason": given.reason,
    }
    if not isinstance(given, Breach):  # the rounds a handler's questions take
        detail["escalations"] = int(record.detail.get("escalations", 0)) + 1
    parked = _changed(
        record,
        given.now,
        given,
        state=PARKED,
        effects=list(given.effects),
        detail=detail,
        attempt=given.attempt,
        error=None,
        source=dict(given.source),
    )
    return Transition(parked, True, after=_OUTBOX_THEN_ACK, rule="park")


def _fail(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Failed)
    assert record is not None
    if given.retryable and given.attempt < given.max_deliver:
        detail = {
            **record.detail,
            "failures": record.failures + 1,
            "last_error": given.error,
            "delay_s": given.delay,
        }
        # The record is the `retrying` event: it carries the attempt's cost (its
        # outcome's usage) and when it started.
        retrying = _changed(
            record,
            given.now,
            given,
            state=RETRYING,
            error=given.error,
            attempt=given.attempt,
            detail=detail,
        )
        return Transition(retrying, True, after=(Nak(given.delay),), rule="retry")
    reason = "failed" if not given.retryable else "max-deliver"
    carried = _changed(record, given.now, given)
    return _bury(
        carried,
        Invalid(
            orphan=carried,
            reason=reason,
            error=given.error,
            attempt=given.attempt,
            stream_seq=record.stream_seq,
            now=given.now,
        ),
    )


def _bury(record: TaskState | None, given: Input) -> Transition:
    """The one dead-letter rule: the message goes to ``dlq.>`` with its reason, then
    the record says ``dead`` (a task that ended meanwhile stays as it ended)."""
    assert isinstance(given, Invalid)
    after: tuple[Action, ...] = () if isinstance(given, GaveUp) else (Ack(),)
    before = (DeadLetter(given.reason, given.error, given.attempt),)
    base = given.orphan if record is None else record
    if base.terminal:
        return Transition(base, before=before, after=after, rule="bury")
    dead = _changed(
        base,
        given.now,
        None,
        state=DEAD,
        error=given.error,
        attempt=given.attempt,
        effects=[],
        detail={**base.detail, "reason": given.reason, "stream_seq": given.stream_seq},
    )
    return Transition(dead, True, before, after, rule="bury")


def _ignore(record: TaskState | None, given: Input) -> Transition:
    assert isinstance(given, Stale)
    return Transition(record, after=(Ignore(given.why), Ack()), rule="ignore")


def _illegal(record: TaskState | None, given: Input) -> Transition:
    """An answer for a task nobody claimed: a bug in the caller, not the task's
    fault. Nothing is written; the delivery comes again and is read first."""
    why = f"{type(given).__name__} cannot reach a task with no record"
    return Transition(record, after=(Restart(why),), rule="illegal")


@dataclass(frozen=True)
class Rule:
    """One row of the table: what an input does to a task in a stage."""

    does: str
    #: The stages it can lead to (the diagram's arrows); empty: the stage stays.
    leads_to: tuple[str, ...]
    apply: Callable[[TaskState | None, Input], Transition] = field(repr=False)


_AGAIN = Rule("done before: its outbox again, ack; the handler does not run", (), _again)
_WAIT = Rule("parked: only its own decision runs it; its outbox again, ack", (), _again)
_BURY = Rule("dead-letter with the reason; the record says dead", (DEAD,), _bury)
_BURY_ENDED = Rule("dead-letter with the reason; the record stays as it ended", (), _bury)
_IGNORE = Rule("out of date: changes nothing, ack", (), _ignore)
_ILLEGAL = Rule("illegal: an answer with no claim; nothing written, delivered again", (), _illegal)
_DECISION_AGAIN = Rule(
    "its decision again (a resumed attempt that failed retries): resumes; another is ignored",
    (RESUMED, REJECTED, CANCELLED, DEAD),
    _resume,
)
_ANOTHER_PARKED = Rule("another delivery parked it meanwhile: its outbox again, ack", (), _again)


def _answers() -> dict[type, Rule]:
    """What a handler's answers do in a stage the task may run from."""
    ends = {
        kind: Rule(f"ends {state}: record, outbox, ack", (state,), _end)
        for kind, state in ENDINGS.items()
    }
    return {
        **ends,
        Escalated: Rule("parks behind the escalation: record, outbox, ack", (PARKED,), _park),
        Breach: Rule("parks for the approval the bus asked: record, outbox, ack", (PARKED,), _park),
        Failed: Rule(
            "retries with backoff while attempts remain, else dead-letters", (RETRYING, DEAD), _fail
        ),
    }


def _build_table() -> dict[tuple[str, type], Rule]:
    table: dict[tuple[str, type], Rule] = {}
    for stage in STAGES:
        terminal = stage in TERMINAL_STATES
        table[(stage, Invalid)] = _BURY_ENDED if terminal else _BURY
        table[(stage, GaveUp)] = _BURY_ENDED if terminal else _BURY
        table[(stage, Stale)] = _IGNORE
        if terminal:
            for kind in (Delivered, Decided, *ENDINGS, Escalated, Breach, Failed):
                table[(stage, kind)] = _AGAIN
            continue
        if stage in (PARKED, RESUMED):
            table[(stage, Delivered)] = _WAIT
            table[(stage, Decided)] = Rule(
                "its decision: approved or answered resumes, refused rejects; another is ignored",
                (RESUMED, REJECTED, CANCELLED, DEAD),
                _resume,
            )
        else:
            table[(stage, Delivered)] = Rule(
                "claims it: asks its boundary, or ends cancelled, or runs the handler",
                (CLAIMED, CANCELLED),
                _claim,
            )
            table[(stage, Decided)] = (
                Rule("a decision for a task with no record: dead-letter", (DEAD,), _orphan_decision)
                if stage == NEW
                else _DECISION_AGAIN
            )
        if stage == NEW:
            for kind in (*ENDINGS, Escalated, Breach, Failed):
                table[(stage, kind)] = _ILLEGAL
        elif stage == PARKED:
            for kind in (*ENDINGS, Escalated, Breach, Failed):
                table[(stage, kind)] = _ANOTHER_PARKED
        else:
            table.update({(stage, kind): rule for kind, rule in _answers().items()})
    return table


#: Every (stage, input) pair and the rule that decides it.
TABLE: Final[Mapping[tuple[str, type], Rule]] = _build_table()


def step(record: TaskState | None, given: Input) -> Transition:
    """What ``given`` does to the task whose newest record is ``record`` (None: it
    has none under this role). Pure: the same arguments give the same transition.

    Before the table, one rule holds in every stage: a delivery (or its answer) whose
    subject is not the record's is another message that took the same task id first
    (the subject names its sender): it is dead-lettered as ``id-taken``, never taken
    for a redelivery of work already done."""
    if (taken := _taken(record, given)) is not None:
        return taken
    return TABLE[(stage_of(record), type(given))].apply(record, given)


def _taken(record: TaskState | None, given: Input) -> Transition | None:
    if record is None or not record.subject:
        return None
    if isinstance(given, Delivered):
        subject: str | None = given.claim.subject
    elif isinstance(given, Answer):
        subject = given.subject
    else:
        return None
    if subject is None or subject == record.subject:
        return None
    error = (
        f"task id {record.task_id} was taken first by a message on {record.subject}; this "
        f"one came on {subject}: two senders used one id"
    )
    attempt = given.claim.attempt if isinstance(given, Delivered) else given.attempt
    return Transition(
        record, before=(DeadLetter("id-taken", error, attempt),), after=(Ack(),), rule="taken"
    )
