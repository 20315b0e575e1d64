from __future__ import annotations

import pytest

from rolebus.errors import SubjectError
from rolebus.wire import subjects


def test_builders_make_the_contract_subjects() -> None:
    assert subjects.task_subject("backend", "implement") == "task.backend.implement"
    assert subjects.handoff_subject("eng-fe", "orders-api") == "handoff.eng-fe.orders-api"
    assert subjects.escalation_subject("architect", "ambiguous-spec") == (
        "escalation.architect.ambiguous-spec"
    )
    assert subjects.decision_subject("eng-be", "abc-1") == "decision.eng-be.abc-1"
    assert subjects.event_subject("task", "completed") == "event.task.completed"
    assert subjects.dlq_subject("eng-be", "task.backend.x") == "dlq.eng-be.task.backend.x"
    assert subjects.parse_dlq_subject("dlq.eng-be.task.backend.x") == ("eng-be", "task.backend.x")


@pytest.mark.parametrize("token", ["back end", "a.b", "*", ">", "", "tab\there", "é", "a:b"])
def test_an_invalid_token_is_refused_with_a_hint(token: str) -> None:
    with pytest.raises(SubjectError) as caught:
        subjects.task_subject(token, "implement")
    assert "not a valid subject token" in caught.value.message
    assert "no spaces, dots" in caught.value.hint


def test_parse_subject_refuses_unknown_families_and_wrong_token_counts() -> None:
    with pytest.raises(SubjectError, match="unknown subject"):
        subjects.parse_subject("jobs.backend.x")
    with pytest.raises(SubjectError, match="has 5 tokens"):
        subjects.parse_subject("task.backend.x.eng-be.y")
    with pytest.raises(SubjectError, match=r"has 5 tokens; event subjects have 3, or 4"):
        subjects.parse_subject("event.handoff.offered.x.y")


def test_a_role_sends_under_its_own_token() -> None:
    parsed = subjects.parse_subject("task.backend.implement.architect")
    assert (parsed.second, parsed.third, parsed.sender) == ("backend", "implement", "architect")
    assert parsed.subject == "task.backend.implement.architect"
    assert subjects.sender_of("task.backend.implement.architect") == "architect"
    assert subjects.sender_of("task.backend.implement") is None
    assert subjects.sender_of("event.task.completed.eng-be") is None
    assert subjects.with_sender("handoff.eng-fe.orders", "eng-be") == "handoff.eng-fe.orders.eng-be"
    assert subjects.with_sender("handoff.eng-fe.orders.eng-be", "eng-be") == (
        "handoff.eng-fe.orders.eng-be"
    )
    assert subjects.with_sender("event.task.completed", "eng-be") == "event.task.completed"
    assert subjects.decision_subject("eng-be", "e1", sender="cto") == "decision.eng-be.e1.cto"


def test_patterns_allow_wildcards_only_as_whole_tokens() -> None:
    assert subjects.validate_pattern("task.*.implement") == "task.*.implement"
    assert subjects.validate_pattern("event.>") == "event.>"
    with pytest.raises(SubjectError):
        subjects.validate_pattern("task.back*.x")
    with pytest.raises(SubjectError):
        subjects.validate_pattern("task.>.x")


def test_a_role_reads_its_domains_and_everything_addressed_to_it() -> None:
    assert subjects.role_filter_subjects("eng-be", ["backend", "api"]) == [
        "task.backend.>",
        "task.api.>",
        "handoff.eng-be.>",
        "escalation.eng-be.>",
        "decision.eng-be.>",
    ]


def test_every_subject_lives_in_exactly_one_stream() -> None:
    assert subjects.stream_for_subject("task.backend.x") == subjects.WORK_STREAM
    assert subjects.stream_for_subject("decision.eng-be.e1") == subjects.WORK_STREAM
    assert subjects.stream_for_subject("event.task.claimed") == subjects.EVENTS_STREAM
    assert subjects.stream_for_subject("dlq.eng-be.task.backend.x") == subjects.DLQ_STREAM


def test_a_three_token_filter_also_matches_what_a_role_sent() -> None:
    assert subjects.with_senders("task.backend.*") == ["task.backend.*", "task.backend.*.*"]
    assert subjects.with_senders("task.backend.>") == ["task.backend.>"]
    assert subjects.with_senders("event.escalation.*") == [
        "event.escalation.*",
        "event.escalation.*.*",
    ]
    assert subjects.with_senders("dlq.eng-be.*") == ["dlq.eng-be.*"]


def test_a_role_writes_its_handoff_and_escalation_events_under_its_own_token() -> None:
    assert subjects.event_subject("escalation", "opened") == "event.escalation.opened"
    assert subjects.event_subject("handoff", "offered", writer="eng-be") == (
        "event.handoff.offered.eng-be"
    )
    assert subjects.parse_subject("event.escalation.decided.person").sender == "person"
