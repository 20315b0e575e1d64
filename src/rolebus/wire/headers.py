"""Every header name rolebus reads or writes, in one place.

NATS headers are case-sensitive on the wire; these are exact. The ``Nats-*`` and
``KV-*`` names are the server's (JetStream publish options, batches, schedules,
direct-get replies, key/value operations); ``Rolebus-*`` and ``traceparent`` are
the wire contract's (see subjects.md).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_TYPE_MSGPACK", "Header"]

CONTENT_TYPE_MSGPACK: Final = "application/msgpack"


class Header:
    """Header names, grouped by who defines them."""

    # --- the wire contract ---------------------------------------------------------------
    MSG_ID: Final = "Nats-Msg-Id"
    CONTENT_TYPE: Final = "Content-Type"
    SCHEMA_VERSION: Final = "Rolebus-Schema"
    TRACEPARENT: Final = "traceparent"
    DLQ_REASON: Final = "Rolebus-Dlq-Reason"
    DLQ_ERROR: Final = "Rolebus-Dlq-Error"
    DLQ_ROLE: Final = "Rolebus-Dlq-Role"
    DLQ_ATTEMPTS: Final = "Rolebus-Dlq-Attempts"
    DLQ_SUBJECT: Final = "Rolebus-Dlq-Subject"
    DLQ_STREAM_SEQ: Final = "Rolebus-Dlq-Stream-Seq"

    # --- JetStream publish options ---------------------------------------------------------
    # Atomic batch publish (NATS 2.12+): every message of a batch carries its id and
    # position; the last one also carries the commit.
    BATCH_ID: Final = "Nats-Batch-Id"
    BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
    BATCH_COMMIT: Final = "Nats-Batch-Commit"
    # Message schedules (NATS 2.12+): the server publishes the message on the target
    # subject at the scheduled time.
    SCHEDULE: Final = "Nats-Schedule"
    SCHEDULE_TARGET: Final = "Nats-Schedule-Target"
    # Compare-and-set append: stored only if the last message on the subjects the
    # second header names (a pattern) is still at the sequence the first one says.
    EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
    EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"

    # --- what the server sets on messages it delivers or returns --------------------------
    STATUS: Final = "Status"
    DESCRIPTION: Final = "Description"
    PENDING_MESSAGES: Final = "Nats-Pending-Messages"
    TIME_STAMP: Final = "Nats-Time-Stamp"
    SEQUENCE: Final = "Nats-Sequence"
    SUBJECT: Final = "Nats-Subject"
    KV_OPERATION: Final = "KV-Operation"
