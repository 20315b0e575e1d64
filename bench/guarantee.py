"""Baselines with the same guarantee as rolebus, and the writes each one costs.

"Effects once" needs, per task, a durable record that a redelivery finds before it
runs the handler again. The least code that gives it with plain nats-py: the fast
pull, then one conditional append per task (``Nats-Expected-Last-Subject-Sequence: 0``
on the task's own subject: it fails if the task was done already) carrying its state
and result, then the ack. The same with one follow-up, published after the record
(the outbox order), for end to end. And a FastStream subscriber doing that append
before its ack.

Writes are counted, not guessed: messages stored per stream during a case, divided
by the tasks.

The layout case compares, with raw nats-py at the worker's concurrency, the ways a
task's transition can be stored: today's record by compare-and-set in the state
bucket then its event (two writes); the state bucket's stream alone as the history
(one compare-and-set); a per-task subject of the history stream with the writing
role as a token, guarded over all of the task's subjects
(``Nats-Expected-Last-Subject-Sequence-Subject``, one append). And the read a
redelivery makes: the task's last record, by its exact subject or by a wildcard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.harness import RawPuller, Results, connect, perf
from rolebus.wire.messages import Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM

#: The rolebus worker's concurrency in bench/roles: the baselines overlap as many.
CONCURRENCY = 64
HISTORY = "RAW_HISTORY"
WRONG_LAST_SEQUENCE = 10071


async def stored(client: Client, streams: list[str]) -> dict[str, int]:
    """Messages stored per stream now (absent streams count 0)."""
    js = client.jetstream()
    counts = {}
    for stream in streams:
        try:
            counts[stream] = int((await js.stream_info(stream)).state.messages)
        except Exception:
            counts[stream] = 0
    return counts


async def raw_consumer(client: Client, name: str) -> None:
    """The durable pull consumer a raw baseline drains the backend's tasks with."""
    await client.jetstream().add_consumer(
        WORK_STREAM,
        ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject="task.backend.>",
            max_ack_pending=20000,
        ),
    )


def writes_per_task(before: dict[str, int], after: dict[str, int], tasks: int) -> float:
    return sum(after[name] - before[name] for name in before) / tasks


async def history_stream(client: Client) -> None:
    js = client.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(HISTORY)
    await js.add_stream(name=HISTORY, subjects=["rawhist.>"], allow_direct=True)


def record(task: Task, state: str, result: Any) -> bytes:
    return msgpack.packb(
        {"task_id": task.id, "state": state, "result": result, "attempt": 1, "at": time.time()}
    )


class Bounded:
    """Run ``work(msg)`` for each message, ``CONCURRENCY`` at a time, like the worker."""

    def __init__(self, work: Callable[[Msg], Awaitable[None]]) -> None:
        self._work = work
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._running: set[asyncio.Task[None]] = set()

    async def __call__(self, msg: Msg) -> None:
        await self._slots.acquire()
        job = asyncio.ensure_future(self._run(msg))
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self._work(msg)
        finally:
            self._slots.release()


async def raw_guaranteed(
    client: Client, count: int, consumer: str, *, follow_up: bool
) -> tuple[float, float, float]:
    """Drain ``count`` prefilled tasks: (tasks/s, stored writes per task, CPU µs per task)."""
    js = client.jetstream()
    await history_stream(client)
    await raw_consumer(client, consumer)
    done = 0
    finished = asyncio.Event()

    async def work(msg: Msg) -> None:
        nonlocal done
        task = Task.model_validate(msgpack.unpackb(msg.data))
        await append_record(js, task)
        if follow_up:
            child = Task(id=f"{task.id}-1", kind="page", title="page", causation_id=task.id)
            await js.publish(
                "task.frontend.page",
                msgpack.packb(child.model_dump(mode="json")),
                headers={"Nats-Msg-Id": child.id},
            )
        await msg.ack()
        done += 1
        if done >= count:
            finished.set()

    streams = [WORK_STREAM, HISTORY]
    before = await stored(client, streams)
    puller = RawPuller(client, WORK_STREAM, consumer, 256, Bounded(work))
    start, cpu = perf(), time.process_time()
    await puller.start()
    await asyncio.wait_for(finished.wait(), 600)
    rate = count / (perf() - start)
    cpu_us = (time.process_time() - cpu) / count * 1e6
    await puller.stop()
    await js.delete_consumer(WORK_STREAM, consumer)
    return rate, writes_per_task(before, await stored(client, streams), count), cpu_us


async def faststream_drain(
    url: str, client: Client, count: int, run: int, *, append: bool
) -> float:
    """Tasks/s of a FastStream pull subscriber (pydantic model) over ``count`` tasks;
    with ``append``, it stores each task's record (conditional append) before its ack."""
    from faststream.nats import JStream, NatsBroker, PullSub

    js = client.jetstream()
    stream, prefix = f"FS_BENCH_{run}_{int(append)}", f"fs{run}{int(append)}"
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    await history_stream(client)
    for offset in range(0, count, 500):
        futures = [
            await js.publish_async(f"{prefix}.task", task.model_dump_json().encode())
            for task in _tasks(min(500, count - offset), f"{prefix}-{offset}-")
        ]
        await asyncio.gather(*futures)
    broker = NatsBroker(url, logger=None, graceful_timeout=2)
    seen = 0
    finished = asyncio.Event()

    @broker.subscriber(
        f"{prefix}.task",
        stream=JStream(name=stream, declare=False),
        durable=prefix,
        pull_sub=PullSub(batch_size=100, timeout=1.0),
        max_workers=CONCURRENCY if append else 1,
    )
    async def handler(body: Task) -> None:
        nonlocal seen
        if append:
            await append_record(js, body)
        seen += 1
        if seen >= count:
            finished.set()

    start = perf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        await broker.start()
    await asyncio.wait_for(finished.wait(), 600)
    rate = count / (perf() - start)
    await broker.stop()
    await js.delete_stream(stream)
    return rate


async def append_record(js: Any, task: Task) -> None:
    """The task's record, stored only if it has none (the once-only fence). A record
    already there means a redelivery of a task that is done: nothing to do but ack
    (a publish whose answer timed out may well have been stored)."""
    try:
        await js.publish(
            f"rawhist.{task.id}",
            record(task, "completed", {"ok": True}),
            headers={"Nats-Expected-Last-Subject-Sequence": "0"},
        )
    except nats.js.errors.APIError as error:
        if error.err_code != WRONG_LAST_SEQUENCE:
            raise


def _tasks(count: int, prefix: str) -> list[Task]:
    return [Task(id=f"{prefix}{n}", kind="implement", title=f"t{n}") for n in range(count)]


async def rolebus_writes(client: Client) -> dict[str, int]:
    """What a rolebus worker writes to, besides the work stream's follow-ups."""
    return await stored(client, [EVENTS_STREAM])


# --- the layout: how one transition is stored ---------------------------------------------

LAYOUT_STREAM = "LAYOUT_HISTORY"


async def bench_layout(url: str, results: Results, *, count: int, run: int) -> None:
    """Tasks/s of each way to store a task's terminal transition (raw nats-py, 64 in
    flight), and the read of a task's last record, exact against wildcard."""
    client = await connect(url)
    js = client.jetstream()
    try:
        for name in (LAYOUT_STREAM, "KV_layout"):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await js.add_stream(name=LAYOUT_STREAM, subjects=["lh.>"], allow_direct=True)
        kv = await js.create_key_value(bucket="layout", history=64, direct=True)
        body = msgpack.packb({"state": "completed", "result": {"ok": True}, "x": "y" * 200})

        async def two_writes(task_id: str) -> None:
            await kv.create(task_id, body)
            await js.publish(f"lh.event.completed.{task_id}", body)

        async def kv_only(task_id: str) -> None:
            await kv.create(task_id, body)

        async def per_task_subject(task_id: str) -> None:
            await js.publish(
                f"lh.task.completed.eng-be.{task_id}",
                body,
                headers={
                    "Nats-Expected-Last-Subject-Sequence": "0",
                    "Nats-Expected-Last-Subject-Sequence-Subject": f"lh.task.*.*.{task_id}",
                },
            )

        shapes = [
            ("state record, then its event (today)", two_writes, "a"),
            ("state bucket's stream as the history", kv_only, "b"),
            ("per-task subject of the history, role token", per_task_subject, "c"),
        ]
        rates = {}
        for label, write, prefix in shapes:
            streams = [LAYOUT_STREAM, "KV_layout"]
            before = await stored(client, streams)
            rates[label] = await _drive(write, [f"{prefix}{run}-{n}" for n in range(count)])
            writes = writes_per_task(before, await stored(client, streams), count)
            metric = results.metric(
                f"layout: {label}",
                "tasks/s",
                baseline_name="per-task subject",
                note=f"{writes:g} stored writes per task",
            )
            metric.rolebus.append(rates[label])
        baseline = rates["per-task subject of the history, role token"]
        for label, _, _ in shapes:
            results.metrics[f"layout: {label}"].baseline.append(baseline)

        ids = [f"c{run}-{n}" for n in range(0, count, max(1, count // 500))]
        exact = await _reads(client, [f"$KV.layout.b{run}-{i[len(f'c{run}-') :]}" for i in ids])
        wild = await _reads(client, [f"lh.task.*.*.{i}" for i in ids], stream=LAYOUT_STREAM)
        metric = results.metric(
            "layout: read a task's last record (wildcard vs exact)",
            "reads/s",
            baseline_name="exact subject (KV get)",
        )
        metric.rolebus.append(wild)
        metric.baseline.append(exact)
    finally:
        for name in (LAYOUT_STREAM, "KV_layout"):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await client.close()


async def _drive(write: Callable[[str], Awaitable[None]], ids: list[str]) -> float:
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(task_id: str) -> None:
        async with slots:
            await write(task_id)

    start = perf()
    await asyncio.gather(*(one(task_id) for task_id in ids))
    return len(ids) / (perf() - start)


async def _reads(client: Client, subjects: list[str], *, stream: str = "KV_layout") -> float:
    start = perf()
    for subject in subjects:
        reply = await client.request(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps({"last_by_subj": subject}).encode()
        )
        if not (reply.headers or {}).get("Nats-Sequence"):
            raise RuntimeError(f"no record for {subject}: {reply.headers}")
    return len(subjects) / (perf() - start)
