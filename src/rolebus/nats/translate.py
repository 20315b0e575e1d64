"""nats-py's exceptions as rolebus errors, and the permission denials behind timeouts.

A denial reaches only the connection's error callback; the operation that was
denied then times out. :class:`Denials` remembers the callback's reports so the
timeout can say what really happened.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from rolebus.errors import PermissionDeniedError, TransportError, UnavailableError
from rolebus.nats.protocol import API, subject_matches

__all__ = ["TIMEOUTS", "Denials", "translate_api", "translated"]

#: What nats-py raises when nobody answered in time.
TIMEOUTS = (nats.errors.TimeoutError, nats.errors.NoRespondersError)


class Denials:
    """Subjects the server refused this connection, as reported to ``error_cb``."""

    def __init__(self) -> None:
        self._when: dict[str, float] = {}  # subject (lower case) -> when the server said no

    def record(self, text: str) -> str | None:
        """Remember the denial in an error text; the subject, or None if it is not one."""
        if "permissions violation" not in text.lower():
            return None
        # nats-py lowercases the server's message: compare subjects in lower case.
        subject = text.rsplit(" ", 1)[-1].strip("\"'").lower()
        self._when[subject] = time.monotonic()
        return subject

    def __bool__(self) -> bool:
        return bool(self._when)

    def covers(self, subject: str) -> bool:
        subject = subject.lower()
        return any(
            pattern == subject or subject_matches(pattern, subject) for pattern in self._when
        )

    def explain_timeout(self, subject: str, error: Exception, what: str) -> TransportError:
        """The error for an operation on ``subject`` that got no answer."""
        if self.covers(subject):
            return PermissionDeniedError(
                f"permission denied: this user may not {what} {subject!r}",
                subject=subject,
                hint="the role's NATS user lacks this permission; see `rolebus auth`",
            )
        return UnavailableError(
            f"JetStream did not answer in time to {what} {subject!r} ({type(error).__name__})",
            subject=subject,
            hint="the server may be restarting or without quorum; it retries by itself "
            "once the server is back (`rolebus status` shows health)",
        )

    def no_jetstream(self, error: Exception, url: str) -> TransportError:
        """The error for a JetStream API call that got no answer at all."""
        if self.covers(f"{API}.STREAM.INFO.>") or self:
            return PermissionDeniedError(
                "permission denied using the JetStream API",
                hint="provisioning needs the admin user; run it once as admin",
            )
        return UnavailableError(
            f"JetStream is not answering on {url} ({type(error).__name__})",
            hint="the server must run with JetStream enabled (`rolebus server` does); "
            "in a cluster, a majority of nodes must be up",
        )


def translate_api(error: nats.js.errors.APIError, what: str) -> TransportError:
    """A JetStream API error (with its code) as a rolebus error."""
    description = error.description or str(error)
    if isinstance(error, nats.js.errors.ServiceUnavailableError):
        return UnavailableError(f"cannot {what}: JetStream unavailable ({description})")
    return TransportError(
        f"cannot {what}: {description} (code {error.err_code})", code=int(error.err_code or 0)
    )


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """nats-py's timeouts and connection errors as rolebus errors."""
    try:
        yield
    except nats.js.errors.ServiceUnavailableError as error:
        raise UnavailableError(f"cannot {what}: JetStream unavailable") from error
    except (
        *TIMEOUTS,
        nats.js.errors.NoStreamResponseError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.StaleConnectionError,
        nats.errors.ConnectionClosedError,
    ) as error:
        raise UnavailableError(
            f"cannot {what}: {type(error).__name__}",
            hint="the server is unreachable or restarting; this is retried",
        ) from error
