"""The NATS protocol facts rolebus relies on, fed as strings and bytes: no server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from rolebus.errors import StreamFullError, TransportError, UnavailableError
from rolebus.nats.protocol import (
    AckMetadata,
    ErrorCode,
    PubAck,
    Status,
    consumer_next_subject,
    delivery_numbers,
    parse_pub_ack,
    parse_time_stamp,
    subject_matches,
)
from rolebus.wire.messages import from_nanoseconds

# The three forms of a JetStream ack reply, as nats.py documents them.
ACK_FORMS = [
    pytest.param(
        "$JS.ACK.ROLEBUS_WORK.worker-eng-be.3.1042.977.1700000000123456789.15",
        None,
        id="9 tokens (no domain)",
    ),
    pytest.param(
        "$JS.ACK.hub.ACCHASH.ROLEBUS_WORK.worker-eng-be.3.1042.977.1700000000123456789.15",
        "hub",
        id="11 tokens (domain, account hash)",
    ),
    pytest.param(
        "$JS.ACK.hub.ACCHASH.ROLEBUS_WORK.worker-eng-be.3.1042.977.1700000000123456789.15.r4nd",
        "hub",
        id="12 tokens (domain, account hash, random token)",
    ),
    pytest.param(
        "$JS.ACK._.ACCHASH.ROLEBUS_WORK.worker-eng-be.3.1042.977.1700000000123456789.15.r4nd",
        None,
        id="12 tokens with the no-domain placeholder",
    ),
]


@pytest.mark.parametrize(("reply", "domain"), ACK_FORMS)
def test_ack_metadata_reads_every_form_by_position(reply: str, domain: str | None) -> None:
    metadata = AckMetadata.from_reply(reply)
    assert metadata == AckMetadata(
        stream="ROLEBUS_WORK",
        consumer="worker-eng-be",
        delivered=3,
        stream_seq=1042,
        consumer_seq=977,
        time_ns=1700000000123456789,
        pending=15,
        domain=domain,
    )
    assert delivery_numbers(reply) == (3, 1042, 1700000000123456789, 15)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "_INBOX.abc.def",
        "$JS.ACK.S.C.1.2.3",  # too short
        "$JS.ACK.a.b.S.C.1.2.3.4",  # 10 tokens: no known form
        "$JS.ACK.S.C.one.2.3.4.5",  # not a number
    ],
)
def test_ack_metadata_refuses_what_is_not_an_ack_reply(reply: str | None) -> None:
    with pytest.raises(TransportError):
        AckMetadata.from_reply(reply)
    with pytest.raises(TransportError):
        delivery_numbers(reply)


def test_a_pub_ack_is_parsed() -> None:
    body = json.dumps({"stream": "ROLEBUS_WORK", "seq": 7, "duplicate": True}).encode()
    assert parse_pub_ack("task.x.y", body) == PubAck("ROLEBUS_WORK", 7, True)
    body = json.dumps({"stream": "ROLEBUS_WORK", "seq": 8}).encode()
    assert parse_pub_ack("task.x.y", body) == PubAck("ROLEBUS_WORK", 8, False)


def refusal(code: int, err_code: int, description: str) -> bytes:
    error = {"code": code, "err_code": err_code, "description": description}
    return json.dumps({"error": error}).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            refusal(503, ErrorCode.STREAM_STORE_FAILED, "maximum messages exceeded"),
            StreamFullError,
            id="discard new: maximum messages",
        ),
        pytest.param(
            refusal(503, ErrorCode.STREAM_STORE_FAILED, "maximum bytes exceeded"),
            StreamFullError,
            id="discard new: maximum bytes",
        ),
        pytest.param(
            refusal(503, ErrorCode.INSUFFICIENT_RESOURCES, "insufficient resources"),
            StreamFullError,
            id="insufficient resources",
        ),
        pytest.param(
            refusal(409, ErrorCode.DUPLICATE_IN_PROCESS, "duplicate message id is in process"),
            UnavailableError,
            id="our own retry meets the first attempt: retry",
        ),
        pytest.param(
            refusal(503, 10008, "JetStream system temporarily unavailable"),
            UnavailableError,
            id="no quorum: retry",
        ),
        pytest.param(
            refusal(400, ErrorCode.STREAM_WRONG_LAST_SEQUENCE, "wrong last sequence: 4"),
            TransportError,
            id="a failed condition is neither full nor unavailable",
        ),
    ],
)
def test_a_refused_publish_is_classified_by_its_error_code(
    body: bytes, expected: type[TransportError]
) -> None:
    with pytest.raises(TransportError) as caught:
        parse_pub_ack("task.backend.build", body)
    assert type(caught.value) is expected
    assert "task.backend.build" in caught.value.message


def test_the_full_stream_hint_says_what_frees_space() -> None:
    with pytest.raises(StreamFullError) as caught:
        parse_pub_ack("task.x.y", refusal(503, 10077, "maximum messages exceeded"))
    assert "purge" in caught.value.hint
    assert "workers catching up frees nothing" in caught.value.hint


def test_a_body_that_is_not_json_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="not a JetStream answer"):
        parse_pub_ack("task.x.y", b"+OK")


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("task.backend.build", "task.backend.build", True),
        ("task.*.build", "task.backend.build", True),
        ("task.*", "task.backend.build", False),
        ("task.>", "task.backend.build", True),
        ("task.>", "task", False),
        (">", "anything.at.all", True),
        ("task.backend", "task.backend.build", False),
        ("task.backend.build.x", "task.backend.build", False),
        ("$js.api.direct.get.kv_rolebus_tasks", "$js.api.direct.get.kv_rolebus_tasks", True),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def test_time_stamps_keep_microseconds_and_default_to_the_epoch() -> None:
    assert parse_time_stamp("2026-12-01T20:05:56.123456789Z") == datetime(
        2026, 12, 1, 20, 5, 56, 123456, tzinfo=UTC
    )
    assert parse_time_stamp("2026-12-01T20:05:56Z") == datetime(2026, 12, 1, 20, 5, 56, tzinfo=UTC)
    assert parse_time_stamp(None) == datetime.fromtimestamp(0, UTC)
    assert parse_time_stamp("yesterday") == datetime.fromtimestamp(0, UTC)


@pytest.mark.parametrize(
    "nanoseconds",
    [0, 999, 1_000, 999_999_999, 1_000_000_000, 1_764_619_556_123_456_789, 4_102_444_800 * 10**9],
)
def test_a_delivery_time_reads_as_its_time_stamp_header_does(nanoseconds: int) -> None:
    # A delivery carries nanoseconds, a direct get the RFC 3339 header: both must give
    # the same datetime, cut (not rounded) to microseconds.
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    header = f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{rest:09d}Z"
    assert from_nanoseconds(nanoseconds) == parse_time_stamp(header)
    assert from_nanoseconds(nanoseconds).tzinfo is UTC


def test_the_statuses_that_end_a_pull_request() -> None:
    assert {"408", "409", "503"} == Status.ENDS_REQUEST
    assert Status.IDLE_HEARTBEAT not in Status.ENDS_REQUEST
    assert consumer_next_subject("S", "C") == "$JS.API.CONSUMER.MSG.NEXT.S.C"


async def test_a_guarded_wait_fails_once_on_a_refusal_and_the_task_goes_on() -> None:
    """Two refusals of the same subject before the task runs cancel it once: the
    error is a PermissionDeniedError and the task is not left cancelling."""
    import asyncio

    import pytest

    from rolebus.errors import PermissionDeniedError
    from rolebus.nats.translate import Denials

    denials = Denials()

    async def operation() -> str:
        with (
            pytest.raises(PermissionDeniedError) as refused,
            denials.guard("write", "$KV.rolebus_tasks.t1"),
        ):
            await asyncio.sleep(10)
        # Not left cancelling: a later asyncio.timeout() in this task must not
        # mistake the refusal for its own cancellation.
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0)
        return refused.value.message

    running = asyncio.ensure_future(operation())
    await asyncio.sleep(0)
    for _ in range(2):
        denials.record('nats: permissions violation for publish to "$kv.rolebus_tasks.t1"')
    assert "may not write '$KV.rolebus_tasks.t1'" in await running
    with denials.guard("write", "$KV.rolebus_tasks.t2"):  # nothing left waiting
        pass
