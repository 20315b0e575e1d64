from __future__ import annotations

from datetime import UTC, datetime

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rolebus.errors import CodecError
from rolebus.wire import codec
from rolebus.wire.messages import Decision, Envelope, Escalation, Event, Handoff, Outcome, Task


def test_a_task_round_trips_through_msgpack_unchanged() -> None:
    task = Task(kind="implement", title="Orders API", payload={"endpoint": "/orders", "n": [1, 2]})
    decoded = codec.decode("task.backend.implement", codec.encode(task))
    assert decoded == task
    assert isinstance(decoded, Task)


def test_the_wire_form_is_a_plain_map_with_rfc3339_utc_times_and_schema_version() -> None:
    task = Task(
        id="t1",
        kind="implement",
        title="x",
        created_at=datetime(2026, 11, 22, 4, 0, tzinfo=UTC),
    )
    wire = msgpack.unpackb(codec.encode(task))
    assert wire["schema_version"] == 1
    assert wire["id"] == "t1"
    assert wire["created_at"] == "2026-11-22T04:00:00Z"
    assert set(wire) >= {"kind", "title", "payload", "from_role", "correlation_id"}


def test_unknown_fields_survive_a_decode_encode_round_trip() -> None:
    body = msgpack.packb(
        {"kind": "implement", "title": "x", "added_in_v2": {"a": 1}, "schema_version": 1}
    )
    task = codec.decode("task.backend.implement", body)
    again = msgpack.unpackb(codec.encode(task))
    assert again["added_in_v2"] == {"a": 1}


def test_a_time_without_offset_is_read_as_utc() -> None:
    body = msgpack.packb({"kind": "k", "title": "t", "created_at": "2026-01-02T03:04:05"})
    task = codec.decode_as(Task, body)
    assert task.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_garbage_bytes_give_a_codec_error_naming_the_subject() -> None:
    with pytest.raises(CodecError, match=r"task\.backend\.x.*not msgpack"):
        codec.decode("task.backend.x", b"\xc1\xff garbage")


def test_a_msgpack_value_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(CodecError, match="not a map"):
        codec.decode("task.backend.x", msgpack.packb([1, 2, 3]))


def test_a_schema_invalid_map_names_the_missing_fields() -> None:
    with pytest.raises(CodecError, match=r"not a valid Task: kind: Field required; title"):
        codec.decode("task.backend.x", msgpack.packb({"payload": {}}))


def test_an_id_with_a_dot_is_refused_because_ids_appear_in_subjects() -> None:
    with pytest.raises(CodecError, match="id"):
        codec.decode("task.backend.x", msgpack.packb({"id": "a.b", "kind": "k", "title": "t"}))


@pytest.mark.parametrize(
    ("subject", "model"),
    [
        ("handoff.eng-fe.orders", Handoff),
        ("escalation.architect.ambiguous-spec", Escalation),
        ("decision.eng-be.e1", Decision),
        ("event.task.completed", Event),
        ("dlq.eng-be.task.backend.x", Task),
    ],
)
def test_each_subject_family_decodes_to_its_message_type(subject: str, model: type) -> None:
    assert codec.message_type_for(subject) is model


def test_an_unknown_subject_family_has_no_message_type() -> None:
    with pytest.raises(CodecError, match="no message type"):
        codec.message_type_for("other.thing.x")


@given(st.binary(max_size=256))
def test_any_bytes_decode_to_a_task_or_a_clean_codec_error(data: bytes) -> None:
    try:
        task = codec.decode("task.backend.x", data)
    except CodecError:
        return
    assert isinstance(task, Task)


def test_an_outcome_helper_builds_a_completed_outcome() -> None:
    assert Outcome.completed({"ok": True}).status == "completed"
    assert Outcome.failed("boom", retryable=False).retryable is False


def test_outcome_helpers_build_the_same_outcome_as_the_command_protocol() -> None:
    from rolebus.wire.messages import EscalationOption, Outcome

    asked = Outcome.escalate(
        "ambiguous-spec",
        "cursor or offset pagination?",
        options=[EscalationOption(name="cursor", tradeoffs="stable under inserts")],
    )
    assert asked == Outcome.model_validate(
        {
            "status": "escalate",
            "escalation": {
                "reason": "ambiguous-spec",
                "question": "cursor or offset pagination?",
                "options": [{"name": "cursor", "tradeoffs": "stable under inserts"}],
            },
        }
    )
    handed = Outcome.hand_off("eng-fe", "orders-api", "1.1.0", note="here is the contract")
    assert handed == Outcome.model_validate(
        {
            "status": "handoff",
            "handoff": {
                "to": "eng-fe",
                "contract": "orders-api",
                "version": "1.1.0",
                "note": "here is the contract",
            },
        }
    )


@pytest.mark.parametrize(
    ("subject", "message", "problem"),
    [
        ("task.backend.spend", Task(kind="spend", title="t"), None),
        ("task.backend.spend", Task(kind="implement", title="t"), "its kind is 'implement'"),
        (
            "handoff.eng-fe.orders-api",
            Handoff(to_role="eng-be", contract="orders-api", version="1.0.0"),
            "its to_role is 'eng-be'",
        ),
        (
            "escalation.cto.spend",
            Escalation(to_role="cto", reason="budget", question="q"),
            "its reason is 'budget'",
        ),
        (
            "decision.eng-be.e1",
            Decision(to_role="eng-be", escalation_id="e2", decision="ok"),
            "its escalation_id is 'e2'",
        ),
        ("decision.eng-be.e1", Decision(to_role="eng-be", escalation_id="e1", decision="ok"), None),
        # who sent it is the subject's fourth token; three tokens: nobody in the team
        ("task.backend.spend.pm", Task(kind="spend", title="t", from_role="pm"), None),
        (
            "task.backend.spend.eng-fe",
            Task(kind="spend", title="t", from_role="cto"),
            "its from_role is 'cto' but its subject names 'eng-fe'",
        ),
        (
            "task.backend.spend",
            Task(kind="spend", title="t", from_role="cto"),
            "its from_role is 'cto' but its subject names no sender",
        ),
        (
            "handoff.eng-fe.orders-api.eng-be",
            Handoff(to_role="eng-fe", contract="orders-api", version="1.0.0"),
            "its from_role is None but its subject names 'eng-be'",
        ),
        (
            "escalation.cto.spend.pm",
            Escalation(to_role="cto", reason="spend", question="q", from_role="eng-be"),
            "its from_role is 'eng-be'",
        ),
        (
            "decision.eng-be.e1.pm",
            Decision(to_role="eng-be", escalation_id="e1", decision="ok", from_role="cto"),
            "its from_role is 'cto'",
        ),
    ],
)
def test_a_body_that_disagrees_with_its_subject_is_named(
    subject: str, message: Envelope, problem: str | None
) -> None:
    found = codec.disagreement(subject, message)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
        assert subject.rsplit(".", 1)[0] in found


def test_a_climbed_escalation_is_sent_on_by_whoever_passed_it_up() -> None:
    # The asker comes from the escalation's record for a copy one level up: the
    # subject names the worker whose supervisor took the timer.
    climbed = Escalation(to_role="cto", reason="spend", question="q", from_role="eng-be", level=1)
    assert codec.disagreement("escalation.cto.spend.pm", climbed) is None
