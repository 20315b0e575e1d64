"""subjects.md is the contract for other languages: it must match the code."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from rolebus.wire import subjects
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Escalation, Event, Handoff, Task

from ..conftest import REPO

DOC = (REPO / "subjects.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", DOC, re.M | re.S)
    assert match, f"subjects.md has no section {title!r}"
    return match.group(1)


def first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def test_every_header_in_the_code_is_documented_and_no_other() -> None:
    in_code = {
        value for name, value in vars(Header).items() if name.isupper() and isinstance(value, str)
    }
    assert set(first_column(section("Headers"))) == in_code


def test_every_stream_is_documented_with_its_subjects() -> None:
    rows = {
        match[0]: set(re.findall(r"`([^`]+)`", match[1]))
        for match in re.findall(r"^\| `(ROLEBUS_\w+)` \| ([^|]+) \|", section("Streams"), re.M)
    }
    assert rows == {spec.name: set(spec.subjects) for spec in subjects.STREAMS}


def test_every_bucket_is_documented_and_no_other() -> None:
    assert set(first_column(section("KV buckets"))) == set(subjects.BUCKETS)


def test_the_consumer_naming_is_documented() -> None:
    assert first_column(section("Consumers")) == [
        subjects.consumer_name("x").replace("-x", "-<role>"),
        subjects.SUPERVISOR_CONSUMER,
    ]


def test_every_subject_family_is_documented() -> None:
    documented = {row.split(".")[0] for row in first_column(section("Subjects"))}
    assert documented == {"task", "handoff", "escalation", "decision", "event", "dlq", "timer"}


@pytest.mark.parametrize("model", [Task, Handoff, Escalation, Decision, Event])
def test_each_message_table_lists_exactly_the_model_fields(model: type[BaseModel]) -> None:
    assert sorted(first_column(section(model.__name__))) == sorted(model.model_fields)
