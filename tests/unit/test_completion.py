"""Reading a model's answer, and the headers of a busy server: no server needed."""

from __future__ import annotations

import pytest

from rolebus.handlers.completion import parse_answer, retry_after, scrub


@pytest.mark.parametrize(
    "text",
    [
        '{"status": "completed", "result": {"ok": true}}',
        '```json\n{"status": "completed", "result": {"ok": true}}\n```',
        '  {"status": "completed", "result": {"ok": true}, "usage": {"model": "forged"}}  ',
    ],
)
def test_an_outcome_is_read_plain_fenced_and_without_a_usage_the_model_made_up(
    text: str,
) -> None:
    outcome, problem = parse_answer(text)
    assert problem == ""
    assert outcome is not None
    assert outcome.result == {"ok": True}
    assert outcome.usage is None  # the bus fills it, not the model


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Sure! Here it is.", "it is not JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"status": "finished"}', "status"),
    ],
)
def test_an_invalid_answer_says_what_is_wrong(text: str, problem: str) -> None:
    outcome, found = parse_answer(text)
    assert outcome is None
    assert problem in found


def test_retry_after_in_seconds_or_milliseconds_and_keys_are_scrubbed() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    assert scrub("bad key sk-abc123 refused", "sk-abc123") == "bad key *** refused"
    assert scrub("nothing to hide", "") == "nothing to hide"
