"""nats-py's exceptions as rolebus errors, and the permission denials behind timeouts.

A denial reaches only the connection's error callback; the operation that was
denied would then wait for its timeout. :class:`Denials` remembers the callback's
reports so that a timeout can say what really happened, and an operation under
:meth:`Denials.guard` fails as soon as the server's refusal of its subject arrives
(at once, not after the timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

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
        #: Operations waiting on the server now: (the subjects they may be refused,
        #: in lower case, and their task).
        self._waiting: set[tuple[tuple[str, ...], asyncio.Task[Any]]] = set()
        #: A refused task -> the subject it was refused (as the operation named it).
        self._refused: dict[asyncio.Task[Any], str] = {}

    def record(self, text: str) -> str | None:
        """Remember the denial in an error text; the subject, or None if it is not one.
        An operation guarded on that subject stops waiting now."""
        if "permissions violation" not in text.lower():
            return None
        # nats-py lowercases the server's message: compare subjects in lower case.
        subject = text.rsplit(" ", 1)[-1].strip("\"'").lower()
        self._when[subject] = time.monotonic()
        for patterns, task in list(self._waiting):
            if task.done() or task in self._refused:
                continue  # one cancel per refusal: a second would hit a later await
            for pattern in patterns:
                if pattern.lower() == subject or subject_matches(pattern.lower(), subject):
                    self._refused[task] = pattern
                    task.cancel()
                    break
        return subject

    @contextlib.contextmanager
    def guard(self, what: str, *subjects: str) -> Iterator[None]:
        """Around one request: if the server refuses one of ``subjects`` (patterns may
        have wildcards) while it waits, a :class:`PermissionDeniedError` naming the
        refused subject at once, instead of a timeout. It costs no task and no timer:
        :meth:`record` cancels the waiting task."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        entry = (subjects, task)
        self._waiting.add(entry)
        try:
            yield
        except asyncio.CancelledError:
            refused = self._refused.pop(task, None)
            if refused is None:
                raise  # cancelled by someone else
            task.uncancel()
            raise self.denied(refused, what) from None
        finally:
            self._waiting.discard(entry)
            self._refused.pop(task, None)

    @staticmethod
    def denied(subject: str, what: str) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"permission denied: this user may not {what} {subject!r}",
            subject=subject,
            hint="the role's NATS user lacks this permission; see `rolebus auth`",
        )

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
            return self.denied(subject, what)
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
