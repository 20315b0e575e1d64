"""Provisioning and inspecting streams, buckets and consumers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StoreCompression,
    StreamConfig,
)

from rolebus.errors import IncompatibleStreamError, TransportError
from rolebus.nats.protocol import API
from rolebus.nats.translate import TIMEOUTS, Denials, translate_api
from rolebus.wire.subjects import BUCKETS, CALLS_BUCKET, PARTS_BUCKET, STREAMS, StreamSpec

__all__ = ["Admin", "ConsumerSpec", "StreamLimits"]

log = structlog.get_logger("rolebus.nats")

_DAY = 86400.0


@dataclass(frozen=True, kw_only=True)
class StreamLimits:
    """How big streams may grow. Work streams refuse new messages when full."""

    replicas: int = 1
    work_max_bytes: int = 1 << 30
    work_max_msgs: int = -1
    max_age: float = 30 * _DAY
    events_max_bytes: int = 4 << 30
    #: How long recorded model calls are kept (None: as long as the events).
    calls_max_age: float | None = None

    @property
    def calls_age(self) -> float:
        return self.calls_max_age if self.calls_max_age is not None else self.max_age


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    """A role's durable pull consumer."""

    stream: str
    name: str
    filter_subjects: tuple[str, ...]
    ack_wait: float
    max_deliver: int
    max_ack_pending: int


class Admin:
    """Streams, buckets and consumers of one connection."""

    def __init__(self, js: JetStreamContext, denials: Denials, url: str) -> None:
        self._js = js
        self._denials = denials
        self._url = url

    async def provision(self, limits: StreamLimits | None = None) -> None:
        """Create rolebus's streams and KV buckets when missing; never replace a
        different existing configuration, report it instead."""
        limits = limits or StreamLimits()
        for spec in STREAMS:
            await self._ensure_stream(spec, limits)
        for bucket in BUCKETS:
            await self._ensure_bucket(bucket, limits)

    def _stream_config(self, spec: StreamSpec, limits: StreamLimits) -> StreamConfig:
        return StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW if spec.work else DiscardPolicy.OLD,
            max_bytes=limits.work_max_bytes if spec.work else limits.events_max_bytes,
            max_msgs=limits.work_max_msgs if spec.work else -1,
            max_age=limits.max_age,
            num_replicas=limits.replicas,
            duplicate_window=120.0,
            allow_direct=True,
            # Escalation timeouts are scheduled messages the server keeps (NATS 2.12+).
            allow_msg_schedules=True if spec.schedules else None,
            # Group commit (groupcommit.py); scheduled messages are not batched.
            allow_atomic=None if spec.schedules else True,
        )

    async def _ensure_stream(self, spec: StreamSpec, limits: StreamLimits) -> None:
        wanted = self._stream_config(spec, limits)
        try:
            info = await self._js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            info = None
        except TIMEOUTS as error:
            raise self._denials.no_jetstream(error, self._url) from error
        if info is None:
            try:
                await self._js.add_stream(wanted)
            except nats.js.errors.APIError as error:
                raise translate_api(error, f"create stream {spec.name}") from error
            log.info("stream created", stream=spec.name)
            return
        have = info.config
        problems = []
        if sorted(have.subjects or []) != sorted(spec.subjects):
            problems.append(f"subjects are {have.subjects}, rolebus needs {list(spec.subjects)}")
        if have.retention != RetentionPolicy.LIMITS:
            problems.append(f"retention is {have.retention}, rolebus needs limits")
        if spec.work and have.discard != DiscardPolicy.NEW:
            problems.append("discard is 'old': a full stream would drop work silently")
        if wanted.allow_msg_schedules and not have.allow_msg_schedules:
            problems.append("message schedules are off: escalation timeouts need them")
        if problems:
            raise IncompatibleStreamError(
                f"stream {spec.name} exists with an incompatible configuration: "
                + "; ".join(problems),
                hint="rolebus does not replace it for you: fix it with `nats stream edit`, "
                "or delete it if its content is not needed",
            )
        if wanted.allow_atomic and not have.allow_atomic:
            await self._allow_atomic(have)

    async def _allow_atomic(self, config: StreamConfig) -> None:
        """Turn atomic batches on for a stream made before group commit (an additive
        change). A user who may not edit streams keeps writing one by one."""
        config.allow_atomic = True
        try:
            await self._js.update_stream(config)
        except (nats.errors.Error, nats.js.errors.Error) as error:
            log.warning(
                "cannot turn on atomic publish: writes go one by one",
                stream=config.name,
                error=type(error).__name__,
                hint="run `rolebus provision` as a user allowed to edit streams",
            )
            return
        log.info("atomic publish turned on", stream=config.name)

    async def _ensure_bucket(self, bucket: str, limits: StreamLimits) -> None:
        try:
            await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if bucket in (CALLS_BUCKET, PARTS_BUCKET):
                await self._add_recording_bucket(bucket, limits)
                return
            await self._js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=64,
                    storage=StorageType.FILE,
                    replicas=limits.replicas,
                    # Reads by direct get: what a role's generated permissions allow.
                    direct=True,
                )
            )
            log.info("bucket created", bucket=bucket)
            return
        except TIMEOUTS as error:
            raise self._denials.no_jetstream(error, self._url) from error

    async def _add_recording_bucket(self, bucket: str, limits: StreamLimits) -> None:
        """A bucket of recorded calls or their parts: one value a key, compressed (JSON
        and prompts compress well), and aged out. A part outlives the records that
        refer to it by a quarter of the age: a writer writes a part again when it last
        did more than a quarter of the age ago (flows/calls.py)."""
        age = limits.calls_age * (1.25 if bucket == PARTS_BUCKET else 1.0)
        config = StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs_per_subject=1,
            max_age=age,
            num_replicas=limits.replicas,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            compression=StoreCompression.S2,
            duplicate_window=120.0 if age > 120.0 else age,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.APIError as error:
            raise translate_api(error, f"create bucket {bucket}") from error
        log.info("bucket created", bucket=bucket, max_age_s=age)

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create or update a role's durable pull consumer (it is ours to adjust)."""
        config = ConsumerConfig(
            durable_name=spec.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            filter_subjects=list(spec.filter_subjects),
            max_waiting=512,
        )
        try:
            await self._js.add_consumer(spec.stream, config)
        except nats.js.errors.APIError as error:
            raise translate_api(error, f"create consumer {spec.name}") from error
        except TIMEOUTS as error:
            raise self._denials.explain_timeout(
                f"{API}.CONSUMER.CREATE.{spec.stream}.{spec.name}", error, "create consumer"
            ) from error

    async def consumer_matches(self, spec: ConsumerSpec) -> bool:
        """True if the consumer exists with the configuration ``spec`` asks for
        (then a worker need not, and with least-privilege credentials may not,
        create it)."""
        subject = f"{API}.CONSUMER.INFO.{spec.stream}.{spec.name}"
        try:
            info = await self._js.consumer_info(spec.stream, spec.name)
        except nats.js.errors.NotFoundError:
            return False
        except TIMEOUTS as error:
            raise self._denials.explain_timeout(subject, error, "look up consumer") from error
        config = info.config
        return (
            sorted(config.filter_subjects or [config.filter_subject or ""])
            == sorted(spec.filter_subjects)
            and abs(float(config.ack_wait or 0) - spec.ack_wait) < 0.001
            and config.max_deliver == spec.max_deliver
        )

    async def delete_stream(self, name: str) -> None:
        """Delete a stream (admin only; others get PermissionDeniedError)."""
        try:
            await self._js.delete_stream(name)
        except nats.js.errors.NotFoundError:
            return
        except TIMEOUTS as error:
            raise self._denials.explain_timeout(
                f"{API}.STREAM.DELETE.{name}", error, "delete stream"
            ) from error

    async def consumer_state(
        self, stream: str, consumer: str, *, filter_subjects: tuple[str, ...] = ()
    ) -> dict[str, int]:
        """Backlog and in-flight counts of one consumer. A consumer that does not
        exist yet (its worker never started) has consumed nothing: its backlog is
        every message stored on ``filter_subjects``."""
        try:
            info = await self._js.consumer_info(stream, consumer)
        except nats.js.errors.NotFoundError:
            pending = await self.stored_on(stream, filter_subjects)
            return {"pending": pending, "ack_pending": 0, "redelivered": 0, "waiting": 0}
        return {
            "pending": int(info.num_pending or 0),
            "ack_pending": int(info.num_ack_pending or 0),
            "redelivered": int(info.num_redelivered or 0),
            "waiting": int(info.num_waiting or 0),
        }

    async def stored_on(self, stream: str, filter_subjects: tuple[str, ...]) -> int:
        """How many messages ``stream`` holds on subjects matching ``filter_subjects``."""
        total = 0
        for pattern in filter_subjects:
            try:
                info = await self._js.stream_info(stream, subjects_filter=pattern)
            except nats.js.errors.NotFoundError:
                return 0
            total += sum((info.state.subjects or {}).values())
        return total

    async def stream_state(self, stream: str) -> dict[str, int]:
        try:
            info = await self._js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise TransportError(
                f"stream {stream!r} does not exist",
                hint="streams: ROLEBUS_WORK, ROLEBUS_EVENTS, ROLEBUS_DLQ "
                "(created by the first command that needs them)",
            ) from None
        state = info.state
        return {
            "messages": int(state.messages),
            "bytes": int(state.bytes),
            "first_seq": int(state.first_seq),
            "last_seq": int(state.last_seq),
        }

    async def storage(self) -> list[dict[str, Any]]:
        """What each of rolebus's streams and buckets holds: messages, bytes, the
        age limit, and the times of its oldest and newest message (the server's
        stream info; nats-py's typed one leaves the times out)."""
        names = [spec.name for spec in STREAMS] + [f"KV_{bucket}" for bucket in BUCKETS]
        found = []
        for name in names:
            try:
                reply = await self._js._nc.request(f"{API}.STREAM.INFO.{name}", b"", timeout=5.0)
            except TIMEOUTS as error:
                raise self._denials.explain_timeout(
                    f"{API}.STREAM.INFO.{name}", error, "look up"
                ) from error
            info = json.loads(reply.data)
            if "error" in info:
                continue  # not made yet: nothing stored
            state, config = info.get("state", {}), info.get("config", {})
            found.append(
                {
                    "name": name.removeprefix("KV_"),
                    "kind": "bucket" if name.startswith("KV_") else "stream",
                    "messages": int(state.get("messages", 0)),
                    "bytes": int(state.get("bytes", 0)),
                    "max_age_s": int(config.get("max_age", 0)) / 1e9,
                    "compression": config.get("compression", "none"),
                    "first": state.get("first_ts"),
                    "last": state.get("last_ts"),
                }
            )
        return found
