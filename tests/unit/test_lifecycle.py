"""The task lifecycle's table, walked: every (stage, input) pair, the rows that carry
the guarantees, and random input sequences that must keep the invariants."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rolebus.flows.actions import (
    Ack,
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
    INPUTS,
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
from rolebus.flows.lifecycle import STAGES, TABLE, rows, rule_for, stage_of, step, witness
from rolebus.flows.record import PARKED, RESUMED, TERMINAL_STATES, TaskState
from rolebus.team.roles import NeverRule

from ..conftest import CliRunner

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TASK = "t1"
WAITING_FOR = f"{TASK}-1"


def record(stage: str, **changes: Any) -> TaskState | None:
    if stage == "new":
        return None
    detail: dict[str, Any] = {}
    source = None
    if stage in (PARKED, RESUMED):
        detail = {"waiting_for": WAITING_FOR, "sent": 1}
        source = {"subject": "task.backend.build", "message": {"id": TASK}}
    fields: dict[str, Any] = {
        "task_id": TASK,
        "state": stage,
        "role": "eng-be",
        "subject": "task.backend.build",
        "kind": "build",
        "attempt": 1,
        "stream_seq": 7,
        "detail": detail,
        "source": source,
    }
    return TaskState.model_validate({**fields, **changes})


def claim(attempt: int = 1) -> TaskState:
    claimed = record("claimed", attempt=attempt)
    assert claimed is not None
    return claimed


def message(msg_id: str, body: str = "", number: str | None = None) -> dict[str, Any]:
    """An outbox entry; its message's id is the task's numbered id it takes."""
    content = {"id": number or msg_id, "b": body}
    return {"subject": "task.frontend.page.eng-be", "msg_id": msg_id, "message": content}


def delivered(**changes: Any) -> Delivered:
    return Delivered(**{"claim": claim(), "now": NOW, **changes})


def decided(escalation_id: str = WAITING_FOR, **changes: Any) -> Decided:
    orphan = record("claimed", task_id="seq-9")
    assert orphan is not None
    fields: dict[str, Any] = {
        "escalation_id": escalation_id,
        "approval": False,
        "approved": None,
        "decided_by": "cto",
        "text": "go ahead",
        "decision": {"id": "d1", "decision": "go ahead"},
        "reason": "spec",
        "orphan": orphan,
        "now": NOW,
        "attempt": 1,
    }
    return Decided(**{**fields, **changes})


def sample(kind: type, sent: int = 0) -> Input:
    """One input of each kind, numbered from ``sent``."""
    numbered: dict[str, Any] = {"now": NOW, "attempt": 1, "numbered_from": sent}
    if kind is Delivered:
        return delivered()
    if kind is Decided:
        return decided()
    if kind is Completed:
        return Completed(effects=(message(f"{TASK}-{sent + 1}"),), sent=sent + 1, **numbered)
    if kind is HandedOver:
        return HandedOver(effects=(message(f"{TASK}-{sent + 1}"),), sent=sent + 1, **numbered)
    if kind is Refused:
        return Refused(now=NOW, attempt=1, error="eng-be never spend")
    if kind is Cancelled:
        return Cancelled(now=NOW, attempt=1, error="cancelled: stop")
    if kind in (Escalated, Breach):
        escalation = f"{TASK}-{sent + 1}"
        return kind(
            escalation_id=escalation,
            to="architect",
            reason="spec",
            effects=(message(f"{escalation}-l0"),),
            sent=sent + 1,
            source={"subject": "task.backend.build", "message": {"id": TASK}},
            **numbered,
        )
    if kind is Failed:
        return Failed(error="boom", retryable=True, max_deliver=5, delay=2.0, **numbered)
    orphan = claim()
    if kind is Invalid:
        return Invalid(
            orphan=orphan, reason="invalid", error="bad", attempt=1, stream_seq=7, now=NOW
        )
    if kind is GaveUp:
        return GaveUp(
            orphan=orphan, reason="max-deliver", error="no ack", attempt=5, stream_seq=7, now=NOW
        )
    if kind is OutboxStuck:
        return OutboxStuck(error="maximum messages exceeded", now=NOW)
    if kind is OutboxStored:
        return OutboxStored(now=NOW)
    assert kind is Stale
    return Stale(why="old news")


def kinds(transition: Transition) -> list[type]:
    return [type(action) for action in (*transition.before, *transition.after)]


# --- the whole table ---------------------------------------------------------------------


def test_every_stage_and_input_pair_has_exactly_one_rule() -> None:
    pairs = [(stage, kind) for stage, kind, _ in rows()]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(stage, kind) for stage in STAGES for kind in INPUTS}
    for stage_rows in TABLE.values():
        assert list(stage_rows) == list(INPUTS), "each stage lists its inputs in one order"


PAIRS = sorted(((stage, kind) for stage, kind, _ in rows()), key=lambda p: (p[0], p[1].__name__))


@pytest.mark.parametrize(("stage", "kind"), PAIRS)
def test_each_pair_leads_only_where_its_rule_says(stage: str, kind: type) -> None:
    before = record(stage)
    transition = step(before, sample(kind, sent=before.sent if before else 0))
    rule = rule_for(stage, kind)
    after = stage_of(transition.record) if transition.write else stage
    if transition.write and not rule.leads_to:
        # Only the outbox notes write without moving: the record says whether the
        # outbox is stored, and keeps its state.
        assert kind in (OutboxStuck, OutboxStored), f"{stage} x {kind.__name__} wrote"
        assert after == stage
    elif transition.write:
        assert after in rule.leads_to, f"{stage} x {kind.__name__} wrote {after}"
    else:
        # Without a write the stored stage stays (a claim is held in memory only).
        assert after in (stage, "claimed"), f"{stage} x {kind.__name__} -> {after}"
    if stage in TERMINAL_STATES:
        assert after == stage, "a finished task's record never changes its state"
        assert Run not in kinds(transition)


def test_the_diagram_shows_every_state_a_rule_leads_to() -> None:
    reached = {target for _, _, rule in rows() for target in rule.leads_to}
    assert reached <= set(STAGES)
    assert reached >= {"claimed", "retrying", PARKED, RESUMED, *TERMINAL_STATES}


# --- the rows that carry the guarantees -----------------------------------------------------


def test_a_first_delivery_runs_the_handler_without_writing() -> None:
    claimed = claim()
    transition = step(None, delivered(claim=claimed))
    assert transition.record == claimed
    assert not transition.write
    assert kinds(transition) == [Run]


def test_a_finished_task_delivered_again_publishes_its_outbox_and_is_not_run() -> None:
    for state in TERMINAL_STATES:
        transition = step(record(state), delivered())
        assert kinds(transition) == [Publish, Ack]
        assert not transition.write


def test_a_parked_task_is_not_run_by_its_own_redelivery() -> None:
    transition = step(record(PARKED), delivered())
    assert kinds(transition) == [Publish, Ack]


def test_a_parked_task_resumes_only_with_its_own_decision() -> None:
    own = step(record(PARKED), decided())
    assert own.write
    assert own.record is not None
    assert own.record.state == RESUMED
    assert kinds(own) == [Run]
    assert own.record.detail["decisions"] == [{"id": "d1", "decision": "go ahead"}]
    other = step(record(PARKED), decided("t1-9"))
    assert not other.write
    assert kinds(other) == [Ignore, Ack]


def test_a_refused_approval_rejects_the_task_with_who_refused() -> None:
    transition = step(record(PARKED), decided(approval=True, approved=False, text="too dear"))
    assert transition.record is not None
    assert transition.record.state == "rejected"
    assert transition.record.error == "not approved by cto: too dear"
    assert kinds(transition) == [Publish, Ack]


def test_an_approved_budget_is_granted_before_the_task_resumes() -> None:
    transition = step(record(PARKED), decided(approval=True, approved=True, reason="budget"))
    assert transition.before == (GrantBudget(WAITING_FOR),)
    assert transition.record is not None
    assert transition.record.detail["approved_by"] == "cto"


def test_a_decision_for_a_task_with_no_record_is_dead_lettered() -> None:
    transition = step(None, decided())
    assert isinstance(transition.before[0], DeadLetter)
    assert transition.record is not None
    assert transition.record.task_id == "seq-9"
    assert transition.record.state == "dead"


def test_a_retryable_failure_retries_with_its_delay_then_dead_letters_at_max_deliver() -> None:
    first = step(claim(), sample(Failed))
    assert first.record is not None
    assert first.record.state == "retrying"
    assert first.record.failures == 1
    assert first.after == (Nak(2.0),)
    last = step(
        claim(5), Failed(now=NOW, attempt=5, error="boom", retryable=True, max_deliver=5, delay=2.0)
    )
    assert last.before == (DeadLetter("max-deliver", "boom", 5),)
    assert last.record is not None
    assert last.record.state == "dead"


def test_a_permanent_failure_dead_letters_at_once() -> None:
    transition = step(
        claim(), Failed(now=NOW, attempt=1, error="bad", retryable=False, max_deliver=5, delay=1)
    )
    assert transition.before == (DeadLetter("failed", "bad", 1),)
    assert kinds(transition) == [DeadLetter, Ack]


def test_an_answer_numbered_from_an_older_record_starts_over() -> None:
    newer = record("redriven", detail={"sent": 2})
    transition = step(newer, sample(Completed, sent=0))
    assert not transition.write
    assert kinds(transition) == [GiveBack]


def test_a_parked_record_met_by_another_attempts_answer_keeps_its_escalation() -> None:
    transition = step(record(PARKED), sample(Failed, sent=1))
    assert not transition.write
    assert kinds(transition) == [Publish, Ack]


def test_an_answer_for_a_task_nobody_claimed_is_illegal_and_writes_nothing() -> None:
    transition = step(None, sample(Completed))
    assert transition.rule == "illegal"
    assert not transition.write
    assert kinds(transition) == [GiveBack]


def test_an_invalid_message_on_a_finished_task_is_buried_and_the_task_stays_as_it_ended() -> None:
    transition = step(record("completed"), sample(Invalid))
    assert not transition.write
    assert kinds(transition) == [DeadLetter, Ack]


def test_a_message_the_server_gave_up_on_is_buried_with_nothing_to_ack() -> None:
    transition = step(claim(), sample(GaveUp))
    assert kinds(transition) == [DeadLetter]
    assert transition.record is not None
    assert transition.record.state == "dead"


def test_a_cancelled_task_ends_without_running() -> None:
    transition = step(None, delivered(cancelled="stop"))
    assert transition.record is not None
    assert transition.record.state == "cancelled"
    assert Run not in kinds(transition)


def test_a_boundary_asks_first_unless_approved() -> None:
    rule = NeverRule(what="spend money", kinds=["build"], action="approval", to="cto")
    asks = step(None, delivered(boundary=rule))
    assert kinds(asks) == [AskBoundary]
    approved = record("retrying", detail={"approved_by": "cto"})
    assert kinds(step(approved, delivered(boundary=rule))) == [Run]


def test_the_last_try_keeps_the_message_first() -> None:
    transition = step(None, delivered(last_try=True))
    assert transition.before == (KeepLastTry(TASK),)
    assert kinds(step(record("completed"), delivered(last_try=True)))[0] is KeepLastTry


def test_a_retry_forgets_its_backoff_but_keeps_its_decisions() -> None:
    retrying = record("retrying", detail={"delay_s": 4, "decisions": [{"id": "d1"}]})
    transition = step(retrying, delivered())
    assert transition.record is not None
    assert transition.record.detail == {"decisions": [{"id": "d1"}]}


def test_the_same_step_gives_the_same_transition() -> None:
    for stage in STAGES:
        for kind in INPUTS:
            before = record(stage)
            given_input = sample(kind, sent=before.sent if before else 0)
            assert step(before, given_input) == step(before, given_input)


# --- random sequences ------------------------------------------------------------------------

EVENTS = st.lists(
    st.sampled_from(
        [
            "deliver",
            "deliver-last",
            "deliver-cancelled",
            "decide-own",
            "decide-other",
            "decide-refused",
            "complete",
            "escalate",
            "fail",
            "fail-permanent",
            "invalid",
            "stale",
        ]
    ),
    max_size=25,
)


class Stream:
    """The task's records as the server holds them, with the compare-and-set the
    executor does: a write based on an older revision is refused, and the input is
    stepped again on the newest record."""

    def __init__(self) -> None:
        self.record: TaskState | None = None
        self.revision = 0
        self.sent: dict[str, dict[str, Any]] = {}

    def apply(self, based_on: TaskState | None, revision: int, given: Input) -> Transition:
        transition = step(based_on, given)
        if transition.write and revision != self.revision:
            transition = step(self.record, given)  # lost the compare-and-set
        was = self.record
        if was is not None and was.terminal:
            assert not transition.write, "a finished task never changes"
            assert Run not in kinds(transition), "a finished task never runs again"
        if Run in kinds(transition) and was is not None and was.state in (PARKED, RESUMED):
            assert isinstance(given, Decided), "a parked task resumes only by a decision"
            assert given.escalation_id == was.waiting_for, "...and only by its own"
        if transition.write:
            assert transition.record is not None
            for entry in transition.record.effects:
                # Each numbered id (<task>-<n>) names one message, whatever its kind.
                number = entry["message"]["id"]
                first = self.sent.setdefault(number, entry)
                assert first == entry, f"{number} was used by two different messages"
            self.record = transition.record
            self.revision += 1
        return transition


@settings(max_examples=600, deadline=None)
@given(EVENTS)
# Two deliveries at once: one parks the task, its decision resumes it, then the
# other's answer (numbered before the park) arrives.
@example(["deliver", "deliver", "escalate", "decide-own", "complete"])
# A finished task delivered again, then answers from runs that never were.
@example(["deliver", "complete", "deliver", "deliver-last", "fail", "decide-own"])
def test_random_inputs_keep_the_invariants(events: list[str]) -> None:
    """Deliveries, decisions and answers in any order. An answer is stepped on the
    record its run started from, so one that comes after other writes (two
    deliveries at once) meets the compare-and-set as it would on the server."""
    stream = Stream()
    runs: list[tuple[TaskState, int]] = []  # runs under way: the record each started from
    for number, event in enumerate(events):
        given_input: Input
        if event.startswith("deliver"):
            given_input = delivered(
                last_try=event == "deliver-last",
                cancelled="stop" if event == "deliver-cancelled" else None,
            )
        elif event.startswith("decide"):
            waiting = stream.record.waiting_for if stream.record is not None else None
            own = waiting if event != "decide-other" and waiting else "t1-99"
            given_input = decided(
                own,
                approval=event == "decide-refused",
                approved=False if event == "decide-refused" else None,
            )
        elif event in ("complete", "escalate", "fail", "fail-permanent"):
            if not runs:
                continue  # an answer comes only after a run
            claimed, base_revision = runs.pop(0)
            base = claimed.sent
            numbered: dict[str, Any] = {"now": NOW, "attempt": 1, "numbered_from": base}
            if event == "complete":
                effects = (message(f"{TASK}-{base + 1}", f"run {number}"),)
                given_input = Completed(effects=effects, sent=base + 1, **numbered)
            elif event == "escalate":
                given_input = Escalated(
                    escalation_id=f"{TASK}-{base + 1}",
                    to="cto",
                    reason="spec",
                    effects=(
                        message(f"{TASK}-{base + 1}-l0", f"run {number}", f"{TASK}-{base + 1}"),
                    ),
                    sent=base + 1,
                    source={"subject": "task.backend.build", "message": {"id": TASK}},
                    **numbered,
                )
            else:
                retryable = event == "fail"
                given_input = Failed(
                    error="x", retryable=retryable, max_deliver=5, delay=1, **numbered
                )
            stream.apply(claimed, base_revision, given_input)
            continue
        elif event == "invalid":
            given_input = sample(Invalid)
        else:
            given_input = sample(Stale)
        transition = stream.apply(stream.record, stream.revision, given_input)
        if Run in kinds(transition):
            assert transition.record is not None
            runs.append((transition.record, stream.revision))


def test_the_random_inputs_reach_every_end() -> None:
    """The sequences above are not idle: they can finish, park and resume a task."""
    stream = Stream()
    first = stream.apply(None, 0, delivered())
    assert first.record is not None
    stream.apply(first.record, 0, sample(Escalated, sent=0))
    assert stream.record is not None
    assert stream.record.state == PARKED
    resumed = stream.apply(stream.record, stream.revision, decided())
    assert resumed.record is not None
    assert resumed.record.state == RESUMED
    stream.apply(resumed.record, stream.revision, sample(Completed, sent=1))
    assert stream.record is not None
    assert stream.record.state == "completed"


def test_rolebus_lifecycle_lists_every_rule_and_refuses_an_unknown_stage(cli: CliRunner) -> None:
    import json

    listed = cli("lifecycle", "--json")
    assert listed.code == 0
    listed_rows = json.loads(listed.stdout)
    assert len(listed_rows) == len(list(rows()))
    parked = [row for row in listed_rows if row["stage"] == PARKED and row["input"] == "Decided"]
    assert parked[0]["leads_to"] == ["resumed", "rejected", "cancelled", "dead"]
    refused = cli("lifecycle", "--stage", "sleeping")
    assert refused.code == 1
    assert "unknown stage 'sleeping'" in refused.stderr


# --- an untrusted world: ids taken, rounds counted, brakes approved ---------------------------


def test_a_delivery_on_another_subject_is_another_message_that_took_the_id() -> None:
    """eng-fe sent a task with eng-be's next follow-up id first: the real one is not
    acked as already done; it is dead-lettered, naming both subjects."""
    taken = record("completed", subject="task.backend.build.eng-fe")
    real = claim()
    transition = step(taken, delivered(claim=real))
    assert transition.rule == "taken"
    assert not transition.write
    dead = transition.before[0]
    assert isinstance(dead, DeadLetter)
    assert dead.reason == "id-taken"
    assert "task.backend.build.eng-fe" in dead.error
    assert "task.backend.build" in dead.error


def test_an_answer_that_meets_another_senders_record_is_not_taken_for_done() -> None:
    answer = Completed(now=NOW, attempt=1, numbered_from=0, subject="task.backend.build")
    other = record("completed", subject="task.backend.build.eng-fe")
    assert step(other, answer).rule == "taken"
    same = record("completed")
    assert step(same, answer).rule == "again"


def test_a_handlers_escalations_count_rounds_and_a_breach_does_not() -> None:
    asked = step(claim(), sample(Escalated))
    assert asked.record is not None
    assert asked.record.detail["escalations"] == 1
    breached = step(claim(), sample(Breach))
    assert breached.record is not None
    assert "escalations" not in breached.record.detail


def test_an_approved_brake_lets_the_task_go_as_far_again() -> None:
    transition = step(record(PARKED), decided(approval=True, approved=True, reason="brake"))
    assert transition.record is not None
    assert transition.record.detail["brakes_approved"] == 1
    assert not any(isinstance(action, GrantBudget) for action in transition.before)


# --- transition coverage -------------------------------------------------------------------
#
# Every step a test in this module takes is recorded as (stage, input, outcome of its rule)
# (Temporal's sdk-core does the same for its machines). The last test fails when an outcome
# a row of the table declares is reached by no test, or a test reaches one it does not
# declare: the table, its rules and the tests cannot drift apart.

REACHED: set[tuple[str, str, str]] = set()


@pytest.fixture(autouse=True, scope="module")
def _record_transitions() -> Iterator[None]:
    witness(lambda stage, kind, outcome: REACHED.add((str(stage), kind.__name__, outcome)))
    yield
    witness(None)


def records_in(stage: str) -> list[TaskState | None]:
    """The records a stage can hold: as usual, waiting for a decision, with a stuck
    outbox, approved, and parked without its input (an old rolebus)."""
    if stage == "new":
        return [None]
    usual = record(stage)
    assert usual is not None
    waiting = {"waiting_for": WAITING_FOR, "sent": 1}
    source = {"subject": "task.backend.build", "message": {"id": TASK}}
    return [
        usual,
        usual.model_copy(update={"detail": {**usual.detail, **waiting}, "source": source}),
        usual.model_copy(update={"detail": {**usual.detail, **waiting}, "source": None}),
        usual.model_copy(update={"detail": {**usual.detail, "effects_pending": "stuck"}}),
        usual.model_copy(update={"detail": {**usual.detail, "approved_by": "cto"}}),
    ]


def variants(kind: type, sent: int) -> list[Input]:
    """Each way an input of ``kind`` can come: numbered from the record's count or
    another, for its own escalation or another, approved or refused, the last try."""
    boundary = NeverRule(what="spend money", kinds=["build"], action="approval", to="cto")
    numbered: dict[str, Any] = {"now": NOW, "attempt": 1, "numbered_from": sent}
    if kind is Delivered:
        return [
            delivered(),
            delivered(last_try=True),
            delivered(boundary=boundary),
            delivered(cancelled="stop"),
        ]
    if kind is Decided:
        return [
            decided(),
            decided("t1-9"),
            decided(approval=True, approved=False),
            decided(approval=True, approved=True, reason="budget"),
            decided(approval=True, approved=True, reason="brake"),
            decided(cancelled="stop"),
            decided(last_try=True),
        ]
    if kind in (Completed, HandedOver, Refused, Cancelled, Escalated, Breach):
        right = sample(kind, sent)
        assert isinstance(right, Answer)
        return [right, dataclasses.replace(right, numbered_from=sent + 5)]
    if kind is Failed:
        return [
            Failed(error="boom", retryable=True, max_deliver=5, delay=2.0, **numbered),
            Failed(error="bad", retryable=False, max_deliver=5, delay=2.0, **numbered),
            Failed(error="boom", retryable=True, max_deliver=1, delay=2.0, **numbered),
        ]
    if kind is OutboxStuck:
        return [OutboxStuck(error="stuck", now=NOW), OutboxStuck(error="full", now=NOW)]
    return [sample(kind, sent)]


@pytest.mark.parametrize(("stage", "kind"), PAIRS)
def test_every_variant_of_every_input_leads_where_its_row_says(stage: str, kind: type) -> None:
    rule = rule_for(stage, kind)
    for before in records_in(stage):
        for given_input in variants(kind, before.sent if before else 0):
            transition = step(before, given_input)
            if transition.rule == "taken":
                continue
            assert transition.rule in rule.outcomes, (stage, kind.__name__, transition.rule)
            if transition.write and transition.record is not None:
                written = stage_of(transition.record)
                assert written in rule.leads_to or written == stage, (stage, kind, written)


def test_every_outcome_of_every_rule_is_reached_by_a_test(request: pytest.FixtureRequest) -> None:
    here = request.node.path
    ran = [item for item in request.session.items if item.path == here]
    if len(ran) < len(PAIRS) * 2 + 10:
        pytest.skip("the coverage is counted over the whole module: run it all")
    declared = {
        (str(stage), kind.__name__, outcome)
        for stage, kind, rule in rows()
        for outcome in rule.outcomes
    }
    reached = {entry for entry in REACHED if entry[2] != "taken"}
    assert sorted(declared - reached) == [], "outcomes no test reaches"
    assert sorted(reached - declared) == [], "outcomes a row does not declare"
