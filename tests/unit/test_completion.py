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


def test_the_outcome_schema_a_model_gets_is_typed_throughout() -> None:
    """Grammar converters (llama.cpp's) refuse a schema node without a type and then
    constrain nothing: every node says what it is."""
    from typing import Any

    from rolebus.handlers.prompt import OUTCOME_SCHEMA

    typed = ("type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const")
    untyped: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if (
                where.count("/")
                and not any(key in node for key in typed)
                and "properties" not in where.rsplit("/", 1)[-1]
            ):
                untyped.append(where)
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for name, sub in value.items():
                        walk(sub, f"{where}/{key}/{name}")
                elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
                    for index, sub in enumerate(value if isinstance(value, list) else [value]):
                        walk(sub, f"{where}/{key}/{index}")

    walk(OUTCOME_SCHEMA, "#")
    assert untyped == []
    assert OUTCOME_SCHEMA["properties"]["result"]["anyOf"][0] == {"type": "object"}
