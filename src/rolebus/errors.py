"""Every error rolebus raises, under one root.

Errors are grouped by who must react: the person who wrote a file or typed a
command (``ConfigError``, ``RoleError``, ``SubjectError``), the network or the
server (``TransportError`` and its branches), or a handler (``HandlerError``).
Each carries the fields it concerns and a ``hint`` saying what to do, so the
CLI can print one clear message instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "ConfigError",
    "ConnectError",
    "HandlerError",
    "IncompatibleStreamError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RetryLaterError",
    "RoleError",
    "RolebusError",
    "ServerError",
    "StaleClaimError",
    "StreamFullError",
    "SubjectError",
    "TransportError",
    "UnavailableError",
]


class RolebusError(Exception):
    """The root of every rolebus error: ``message`` says what, ``hint`` says what to do."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(RolebusError):
    """A setting, option or environment variable is wrong."""


class RoleError(ConfigError):
    """A role file (or the team as a whole) is invalid: names the file and the field."""

    def __init__(self, message: str, *, file: str = "", field: str = "", hint: str = "") -> None:
        where = ", ".join(part for part in (file, f"field '{field}'" if field else "") if part)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.file = file
        self.field = field


class SubjectError(ConfigError):
    """A subject or one of its tokens is invalid, or no stream holds it."""

    def __init__(self, message: str, *, subject: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.subject = subject


class CodecError(RolebusError):
    """Bytes that are not a valid rolebus message. ``kind`` says which:
    ``undecodable`` (not msgpack, not a map, no message type for its subject) or
    ``invalid`` (a map that is not a valid message of its type)."""

    def __init__(
        self, message: str, *, subject: str = "", hint: str = "", kind: str = "undecodable"
    ) -> None:
        super().__init__(message, hint=hint)
        self.subject = subject
        self.kind = kind


class NotFoundError(RolebusError):
    """A task, escalation, contract, role or stream that does not exist."""


class ServerError(RolebusError):
    """The embedded nats-server could not be started or found."""


class TransportError(RolebusError):
    """Talking to NATS failed. ``code`` is JetStream's error code when it gave one."""

    def __init__(self, message: str, *, subject: str = "", hint: str = "", code: int = 0) -> None:
        super().__init__(message, hint=hint)
        self.subject = subject
        self.code = code


class ConnectError(TransportError):
    """No NATS server could be reached (or it refused our credentials)."""


class UnavailableError(TransportError):
    """The server is up but JetStream cannot answer (no leader, no quorum)."""


class PermissionDeniedError(TransportError):
    """The server refused an operation for this user's permissions."""


class PayloadTooLargeError(TransportError):
    """A message is larger than the server's max_payload; it was not sent."""

    def __init__(self, *, size: int, limit: int, subject: str) -> None:
        super().__init__(
            f"message for {subject!r} is {size:,} bytes, over the server's "
            f"max_payload of {limit:,} bytes; it was not sent",
            subject=subject,
            hint="put large content somewhere else (an object store, a file) and "
            "send a reference in the payload, or raise max_payload on the server",
        )
        self.size = size
        self.limit = limit


class StreamFullError(TransportError):
    """A work stream reached its limits and refused the message (discard: new)."""


class IncompatibleStreamError(TransportError):
    """A stream or bucket exists with a configuration rolebus cannot use."""


class RetryLaterError(RolebusError):
    """The bus could not finish a delivery now (a write the server did not take, a
    newer record); the delivery is given back and comes again."""


class StaleClaimError(RetryLaterError):
    """A worker's view of a task is out of date; the delivery is retried."""


class HandlerError(RolebusError):
    """A handler failed in a way the worker must classify (retry, dead-letter)."""

    def __init__(self, message: str, *, retryable: bool, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable
