"""Facts of the NATS and JetStream protocol, as pure functions: no I/O.

Ack-reply metadata, pub-ack and status parsing, the server's error codes as named
constants, subject matching, time stamps. The I/O modules of this package call
these; the unit tier tests them by feeding strings and bytes, with no server.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from rolebus.errors import StreamFullError, TransportError, UnavailableError

__all__ = [
    "API",
    "AckMetadata",
    "ErrorCode",
    "PubAck",
    "Status",
    "consumer_next_subject",
    "delivery_numbers",
    "parse_pub_ack",
    "parse_time_stamp",
    "subject_matches",
]

#: The JetStream API's subject prefix.
API: Final = "$JS.API"


class Status:
    """The ``Status`` header of a message the server sends in place of a delivery."""

    IDLE_HEARTBEAT: Final = "100"  # the pull request is alive
    NOT_FOUND: Final = "404"  # no messages (a no-wait request)
    REQUEST_TIMEOUT: Final = "408"  # the pull request expired
    CONFLICT: Final = "409"  # the request was ended: leader change, consumer deleted, ...
    NO_RESPONDERS: Final = "503"  # no consumer leader right now

    #: Statuses after which the rest of that pull request will never come.
    ENDS_REQUEST: Final = frozenset({REQUEST_TIMEOUT, CONFLICT, NO_RESPONDERS})


class ErrorCode:
    """JetStream's ``err_code`` values that rolebus reacts to (server/errors.json)."""

    INSUFFICIENT_RESOURCES: Final = 10023
    STORAGE_RESOURCES_EXCEEDED: Final = 10047
    STREAM_WRONG_LAST_SEQUENCE: Final = 10071
    STREAM_STORE_FAILED: Final = 10077  # e.g. "maximum messages exceeded" (discard: new)
    DUPLICATE_IN_PROCESS: Final = 10158  # "duplicate message id is in process"

    #: The stream refused the message because it is full.
    FULL: Final = frozenset({INSUFFICIENT_RESOURCES, STORAGE_RESOURCES_EXCEEDED})


def consumer_next_subject(stream: str, consumer: str) -> str:
    """Where a pull request for ``consumer`` is sent."""
    return f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"


@dataclass(frozen=True, slots=True)
class AckMetadata:
    """What the reply subject of a JetStream delivery says about it.

    Two forms exist: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<ns>.<pending>`` (9 tokens), and with the domain and account
    hash after ``ACK`` (11 tokens, 12 with a trailing random token). Tokens are
    read by position from the front: counting from the end is wrong in the
    12-token form.
    """

    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    consumer_seq: int
    time_ns: int
    pending: int
    domain: str | None = None

    @classmethod
    def from_reply(cls, reply: str | None) -> AckMetadata:
        tokens, first, domain = _ack_tokens(reply)
        try:
            return cls(
                stream=tokens[first],
                consumer=tokens[first + 1],
                delivered=int(tokens[first + 2]),
                stream_seq=int(tokens[first + 3]),
                consumer_seq=int(tokens[first + 4]),
                time_ns=int(tokens[first + 5]),
                pending=int(tokens[first + 6]),
                domain=domain,
            )
        except ValueError:
            raise TransportError(f"ack reply with a non-numeric field: {reply!r}") from None


def delivery_numbers(reply: str | None) -> tuple[int, int, int, int]:
    """``(delivered, stream_seq, time_ns, pending)`` of a JetStream delivery, read
    as :meth:`AckMetadata.from_reply` reads them: what every delivered message
    needs, without building the whole record (that costs more than the rest)."""
    tokens, first, _ = _ack_tokens(reply)
    try:
        return (
            int(tokens[first + 2]),
            int(tokens[first + 3]),
            int(tokens[first + 5]),
            int(tokens[first + 6]),
        )
    except ValueError:
        raise TransportError(f"ack reply with a non-numeric field: {reply!r}") from None


def _ack_tokens(reply: str | None) -> tuple[list[str], int, str | None]:
    """The reply's tokens, where the stream's name is among them, and the domain."""
    tokens = (reply or "").split(".")
    count = len(tokens)
    if count < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise TransportError(f"not a JetStream ack reply: {reply!r}")
    if count == 9:
        return tokens, 2, None
    if count in (11, 12):
        return tokens, 4, (None if tokens[2] == "_" else tokens[2])
    raise TransportError(f"ack reply with {count} tokens: {reply!r}")


@dataclass(frozen=True)
class PubAck:
    """The server's answer to a JetStream publish: where the message was stored."""

    stream: str
    seq: int
    duplicate: bool


def parse_pub_ack(subject: str, body: bytes) -> PubAck:
    """The pub-ack in ``body``, or the rolebus error for the server's refusal."""
    try:
        response: dict[str, Any] = json.loads(body)
    except ValueError:
        raise TransportError(f"not a JetStream answer for {subject!r}: {body[:80]!r}") from None
    error = response.get("error")
    if error:
        raise pub_ack_error(
            subject,
            code=int(error.get("code", 0)),
            err_code=int(error.get("err_code", 0)),
            description=str(error.get("description", "")),
        )
    return PubAck(
        stream=str(response["stream"]),
        seq=int(response["seq"]),
        duplicate=bool(response.get("duplicate", False)),
    )


def pub_ack_error(subject: str, *, code: int, err_code: int, description: str) -> TransportError:
    """Classify a refused publish by the server's error code."""
    if err_code in ErrorCode.FULL or (
        # "maximum messages/bytes exceeded" share their code with other store failures.
        err_code == ErrorCode.STREAM_STORE_FAILED and "maximum" in description
    ):
        return StreamFullError(
            f"the stream refused {subject!r}: {description}",
            subject=subject,
            hint="the stream is full and refuses new messages (discard: new) rather than "
            "dropping old work; handled tasks stay in it until they age out (limits retention), so "
            "workers catching up frees nothing: purge handled history "
            "(`nats stream purge`) or raise its limits (`nats stream edit`)",
            code=err_code,
        )
    if code == 503 or err_code == ErrorCode.DUPLICATE_IN_PROCESS:
        # The second: our own retry met the first attempt still being stored (during
        # a leader election, say); retrying is right.
        return UnavailableError(
            f"JetStream unavailable for {subject!r}: {description}", subject=subject
        )
    return TransportError(
        f"JetStream refused {subject!r}: {description}", subject=subject, code=err_code
    )


def subject_matches(pattern: str, subject: str) -> bool:
    """True if ``subject`` matches ``pattern`` (with ``*`` and ``>`` wildcards)."""
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens) or token not in ("*", subject_tokens[index]):
            return False
    return len(pattern_tokens) == len(subject_tokens)


def parse_time_stamp(value: str | None) -> datetime:
    """A ``Nats-Time-Stamp`` header (RFC 3339, nanoseconds) as a datetime; the epoch
    when absent or unreadable."""
    if not value:
        return datetime.fromtimestamp(0, UTC)
    with contextlib.suppress(ValueError):
        # Nanosecond precision does not fit datetime: cut to microseconds.
        head, _, tail = value.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(tail + '000000')[:6]}+00:00")
    return datetime.fromtimestamp(0, UTC)
