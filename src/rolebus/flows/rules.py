"""The rules of :data:`rolebus.flows.lifecycle.TABLE`: what one input does to a task's
newest record, each typed by the input it takes.

A rule returns a :class:`~rolebus.flows.actions.Transition` whose ``rule`` names the
outcome it chose (``claim`` may ``ask``, ``cancel`` or ``run``): the table lists the
outcomes each row can reach, and the transition coverage test fails when a test
reaches none of them. Pure: no I/O, no clock (time comes with the input).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from rolebus.flows.actions import (
    Ack,
    Action,
    AskBoundary,
    DeadLetter,
    GiveBack,
    GrantBudget,
    Ignore,
    KeepLastTry,
    Nak,
    Publish,
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
    OutboxStored,
    OutboxStuck,
    Refused,
    Stale,
)
from rolebus.flows.record import State, TaskState
from rolebus.team.authority import BRAKE_REASON
from rolebus.team.budget import BUDGET_REASON

__all__ = [
    "ENDINGS",
    "again",
    "bury",
    "claim",
    "end",
    "fail",
    "give_back",
    "id_taken",
    "ignore",
    "illegal",
    "orphan_decision",
    "outbox_stored",
    "outbox_stuck",
    "park",
    "resume",
]

#: The answers that end a task, and the state each ends it in.
ENDINGS: Final[dict[type[Ending], State]] = {
    Completed: State.COMPLETED,
    HandedOver: State.HANDED_OFF,
    Refused: State.REJECTED,
    Cancelled: State.CANCELLED,
}

_RUN: Final[tuple[Action, ...]] = (Run(),)


def _changed(record: TaskState, now: datetime, answer: Answer | None, **changes: Any) -> TaskState:
    """``record`` with ``changes``: an answer's outcome is carried by every record
    after it (its usage is reported by the first one that stores it)."""
    if answer is not None and answer.outcome is not None:
        changes = {"outcome": dict(answer.outcome), "usage_reported": False, **changes}
    return record.model_copy(update={**changes, "updated_at": now})


def _last_try(record: TaskState | None, given: Delivered | Decided) -> tuple[Action, ...]:
    return (KeepLastTry(record.task_id),) if given.last_try and record is not None else ()


def again(record: TaskState | None, given: Input) -> Transition:
    """Done before (or parked): its outbox again (the same Msg-Ids), then ack; the
    handler does not run twice."""
    before = _last_try(record, given) if isinstance(given, Delivered | Decided) else ()
    return Transition(
        record=record, before=before, after=(Publish(again=True), Ack()), rule="again"
    )


def claim(record: TaskState | None, given: Delivered) -> Transition:
    """A delivery claims the task: asks its boundary, ends it cancelled, or runs it."""
    claimed = given.claim
    if record is not None:
        # Decisions, escalations and a parked task's input survive a new attempt.
        detail = {key: value for key, value in record.detail.items() if key != "delay_s"}
        claimed = claimed.model_copy(update={"detail": detail, "source": record.source})
    before = _last_try(claimed, given)
    if given.boundary is not None and not claimed.detail.get("approved_by"):
        return Transition(
            record=claimed, before=before, after=(AskBoundary(given.boundary),), rule="ask"
        )
    if given.cancelled is not None:
        ending = Cancelled(
            now=given.now, attempt=claimed.attempt, error=f"cancelled: {given.cancelled}"
        )
        ended = end(claimed, ending)
        return Transition(
            record=ended.record, write=True, before=before, after=ended.after, rule="cancel"
        )
    return Transition(record=claimed, before=before, after=_RUN, rule="run")


def resume(record: TaskState, given: Decided) -> Transition:
    """Its own decision resumes a parked task (or ends it: refused, cancelled)."""
    if record.waiting_for != given.escalation_id:
        why = f"task {record.task_id} is not waiting for {given.escalation_id}"
        return ignore(record, Stale(why=why))
    if record.source is None:
        return bury(
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
    before = _last_try(record, given)
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
        ended = end(_changed(record, given.now, None, **fresh), answer)
        return Transition(
            record=ended.record, write=True, before=before, after=ended.after, rule=rule
        )

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
    resumed = _changed(record, given.now, None, state=State.RESUMED, detail=detail, **fresh)
    return Transition(record=resumed, write=True, before=before, after=_RUN, rule="resume")


def orphan_decision(record: None, given: Decided) -> Transition:
    """A decision for a task this role has no record of."""
    return bury(
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
    why = f"task {record.task_id} has a record this attempt did not read"
    return Transition(record=record, after=(GiveBack(why),), rule="restart")


def end(record: TaskState, given: Ending) -> Transition:
    """The handler's answer ends the task: its record, then its outbox, then the ack."""
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
    return Transition(
        record=ended,
        write=True,
        shares_batch=True,
        after=(Publish(shares_batch=True), Ack()),
        rule="end",
    )


def park(record: TaskState, given: Escalated) -> Transition:
    """The task waits for the escalation its answer (or the bus) opened."""
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
        state=State.PARKED,
        effects=list(given.effects),
        detail=detail,
        attempt=given.attempt,
        error=None,
        source=dict(given.source),
    )
    return Transition(record=parked, write=True, after=(Publish(), Ack()), rule="park")


def fail(record: TaskState, given: Failed) -> Transition:
    """Retries with the delay while attempts remain and it may; dead-letters otherwise."""
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
            state=State.RETRYING,
            error=given.error,
            attempt=given.attempt,
            detail=detail,
        )
        return Transition(record=retrying, write=True, after=(Nak(given.delay),), rule="retry")
    reason = "failed" if not given.retryable else "max-deliver"
    carried = _changed(record, given.now, given)
    return bury(
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


def bury(record: TaskState | None, given: Invalid) -> Transition:
    """The one dead-letter rule: the message goes to ``dlq.>`` with its reason, then
    the record says ``dead`` (a task that ended meanwhile stays as it ended)."""
    after: tuple[Action, ...] = () if isinstance(given, GaveUp) else (Ack(),)
    before = (DeadLetter(given.reason, given.error, given.attempt),)
    base = given.orphan if record is None else record
    if base.terminal:
        return Transition(record=base, before=before, after=after, rule="bury-ended")
    dead = _changed(
        base,
        given.now,
        None,
        state=State.DEAD,
        error=given.error,
        attempt=given.attempt,
        effects=[],
        detail={**base.detail, "reason": given.reason, "stream_seq": given.stream_seq},
    )
    return Transition(record=dead, write=True, before=before, after=after, rule="bury")


def ignore(record: TaskState | None, given: Stale) -> Transition:
    """Out of date: changes nothing; ack."""
    return Transition(record=record, after=(Ignore(given.why), Ack()), rule="ignore")


def illegal(record: None, given: Input) -> Transition:
    """An answer for a task nobody claimed: a bug in the caller, not the task's
    fault. Nothing is written; the delivery comes again and is read first."""
    why = f"{type(given).__name__} cannot reach a task with no record"
    return Transition(record=record, after=(GiveBack(why),), rule="illegal")


def give_back(record: TaskState, given: OutboxStuck | OutboxStored) -> Transition:
    """An outbox note met a record another delivery wrote meanwhile: that record is
    in charge; this delivery comes again and reads it."""
    why = f"task {record.task_id} has a newer record ({record.state}) than its outbox"
    return Transition(record=record, after=(GiveBack(why),), rule="give-back")


def outbox_stuck(record: TaskState, given: OutboxStuck) -> Transition:
    """The outbox could not all be stored: the record says so (a task must not look
    done while its follow-ups do not exist), and the delivery comes again."""
    after = (GiveBack(given.error),)
    if record.effects_pending == given.error:
        return Transition(record=record, after=after, rule="still-stuck")
    noted = _changed(
        record, given.now, None, detail={**record.detail, "effects_pending": given.error}
    )
    return Transition(record=noted, write=True, after=after, rule="stuck")


def outbox_stored(record: TaskState, given: OutboxStored) -> Transition:
    """A stuck outbox is stored now: the record says so (kept as None, not dropped:
    the record was counted as completed once), and the delivery is done."""
    cleared = _changed(record, given.now, None, detail={**record.detail, "effects_pending": None})
    return Transition(record=cleared, write=True, after=(Ack(),), rule="unstuck")


def id_taken(record: TaskState, subject: str, attempt: int) -> Transition:
    """A delivery (or its answer) on another subject than the record's: another
    message took the same task id first (the subject names its sender)."""
    error = (
        f"task id {record.task_id} was taken first by a message on {record.subject}; this "
        f"one came on {subject}: two senders used one id"
    )
    return Transition(
        record=record,
        before=(DeadLetter("id-taken", error, attempt),),
        after=(Ack(),),
        rule="taken",
    )
