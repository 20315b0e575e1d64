"""The benchmark cases: each measures rolebus and its baseline in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.guarantee import (
    faststream_drain,
    raw_consumer,
    raw_guaranteed,
    rolebus_writes,
    writes_per_task,
)
from bench.harness import RawPuller, Results, connect, percentile, perf, wait_until
from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.record import TaskState
from rolebus.history.replay import ReplayFilter, replay
from rolebus.nats.delivery import StoredMessage
from rolebus.team.roles import load_team
from rolebus.wire.messages import Event, Task
from rolebus.wire.subjects import EVENTS_STREAM, WORK_STREAM
from rolebus.worker.runner import start_workers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROLES = HERE / "roles"
SUBJECT = "task.backend.implement"


def make_tasks(count: int, prefix: str) -> list[Task]:
    return [
        Task(
            id=f"{prefix}{number}",
            kind="implement",
            title=f"Orders API endpoint {number}",
            payload={"endpoint": "/orders", "n": number, "notes": "x" * 100},
        )
        for number in range(count)
    ]


def raw_headers(task_id: str) -> dict[str, str]:
    return {"Nats-Msg-Id": task_id, "Content-Type": "application/msgpack"}


async def reset(client: Client) -> None:
    """Empty the work stream and drop its consumers between cases."""
    js = client.jetstream()
    for stream in (WORK_STREAM, EVENTS_STREAM):
        consumers = await js.consumers_info(stream)
        for consumer in consumers:
            await js.delete_consumer(stream, consumer.name)
        await js.purge_stream(stream)


# --- 1. publish ----------------------------------------------------------------------------


async def bench_publish(url: str, results: Results, *, count: int, run: int) -> None:
    bus = await Bus.connect(Settings(nats_url=url), name="bench-publish")
    client = await connect(url)
    js = client.jetstream(publish_async_max_pending=4000)
    try:
        tasks = make_tasks(count, f"p{run}r")
        start = perf()
        for task in tasks:
            await bus.publish(SUBJECT, task)
        results.metric("publish, an ack each", "tasks/s", target=0.9).rolebus.append(
            count / (perf() - start)
        )

        tasks = make_tasks(count, f"p{run}w")
        start = perf()
        for task in tasks:
            await js.publish(
                SUBJECT, msgpack.packb(task.model_dump(mode="json")), headers=raw_headers(task.id)
            )
        results.metric("publish, an ack each", "tasks/s").baseline.append(count / (perf() - start))

        tasks = make_tasks(count, f"p{run}R")
        start = perf()
        await bus.publish_many([(SUBJECT, task) for task in tasks], window=500)
        results.metric(
            "publish, many in flight",
            "tasks/s",
            target=0.8,
            note="Bus.publish_many vs js.publish_async",
        ).rolebus.append(count / (perf() - start))

        tasks = make_tasks(count, f"p{run}W")
        start = perf()
        for offset in range(0, count, 500):
            futures = [
                await js.publish_async(
                    SUBJECT,
                    msgpack.packb(task.model_dump(mode="json")),
                    headers=raw_headers(task.id),
                )
                for task in tasks[offset : offset + 500]
            ]
            await asyncio.gather(*futures)
        results.metric("publish, many in flight", "tasks/s").baseline.append(
            count / (perf() - start)
        )
    finally:
        await bus.close()
        await client.close()


async def bench_publish_faststream(url: str, results: Results, *, count: int, run: int) -> None:
    from faststream.nats import NatsBroker

    bus = await Bus.connect(Settings(nats_url=url), name="bench-publish")
    broker = NatsBroker(url, logger=None, graceful_timeout=2)
    await broker.start()
    try:
        tasks = make_tasks(count, f"f{run}r")
        start = perf()
        for task in tasks:
            await bus.publish(SUBJECT, task)
        rate = count / (perf() - start)
        tasks = make_tasks(count, f"f{run}f")
        start = perf()
        for task in tasks:
            await broker.publish(task, SUBJECT, stream=WORK_STREAM)
        metric = results.metric(
            "publish vs FastStream, an ack each",
            "tasks/s",
            baseline_name="FastStream",
            note="both make one request per publish: parity is the limit",
        )
        metric.rolebus.append(rate)
        metric.baseline.append(count / (perf() - start))
    finally:
        await broker.stop()
        await bus.close()


# --- 2. consume ----------------------------------------------------------------------------


async def prefill(url: str, count: int, prefix: str) -> None:
    bus = await Bus.connect(Settings(nats_url=url), name="bench-fill")
    try:
        await bus.publish_many([(SUBJECT, task) for task in make_tasks(count, prefix)])
    finally:
        await bus.close()


async def bench_consume(url: str, results: Results, *, count: int, run: int) -> None:
    client = await connect(url)
    try:
        await reset(client)
        before = await rolebus_writes(client)
        rate, cpu_us = await _consume_with_rolebus(url, count, f"c{run}r")
        ours = writes_per_task(before, await rolebus_writes(client), count)
        results.metric(
            "consume vs raw, ack only (what the guarantee costs)",
            "tasks/s",
            note="rolebus records each task once-only; this raw worker only acks",
        ).rolebus.append(rate)

        await reset(client)
        await prefill(url, count, f"c{run}g")
        raw_rate, raw_writes, raw_cpu = await raw_guaranteed(
            client, count, "raw-guarantee", follow_up=False
        )
        same = results.metric(
            "consume vs raw with the same guarantee",
            "tasks/s",
            target=0.8,
            note="raw: one conditional append per task (its record), then the ack",
        )
        same.rolebus.append(rate)
        same.baseline.append(raw_rate)
        writes = results.metric(
            "stored writes per task, worker side, no follow-up",
            "writes",
            higher_is_better=False,
            target=1.0,
            baseline_name="raw, same guarantee",
            note="messages stored per stream during the case / tasks",
        )
        writes.rolebus.append(ours)
        writes.baseline.append(raw_writes)
        cpu = results.metric(
            "worker CPU per task at saturation",
            "us",
            higher_is_better=False,
            baseline_name="raw, same guarantee",
            note="process CPU time / tasks, in process; the issue's target: <= 100 us",
        )
        cpu.rolebus.append(cpu_us)
        cpu.baseline.append(raw_cpu)
        fair = results.metric(
            "consume vs FastStream with the same guarantee",
            "tasks/s",
            target=2.0,
            baseline_name="FastStream + append",
        )
        fair.rolebus.append(rate)
        fair.baseline.append(await faststream_drain(url, client, count, run, append=True))

        await reset(client)
        await prefill(url, count, f"c{run}w")
        await raw_consumer(client, "raw-consume")
        done = 0
        finished = asyncio.Event()

        async def handle(msg: Msg) -> None:
            nonlocal done
            Task.model_validate(msgpack.unpackb(msg.data))
            await msg.ack()
            done += 1
            if done >= count:
                finished.set()

        puller = RawPuller(client, WORK_STREAM, "raw-consume", 500, handle)
        start = perf()
        await puller.start()
        await asyncio.wait_for(finished.wait(), 600)
        raw_rate = count / (perf() - start)
        await puller.stop()
        results.metric(
            "consume vs raw, ack only (what the guarantee costs)", "tasks/s"
        ).baseline.append(raw_rate)
        fast = results.metric(
            "consume vs FastStream, ack only (what the guarantee costs)",
            "tasks/s",
            baseline_name="FastStream pull",
        )
        fast.rolebus.append(rate)
        fast.baseline.append(await faststream_drain(url, client, count, run, append=False))
    finally:
        await client.close()


async def _consume_with_rolebus(url: str, count: int, prefix: str) -> tuple[float, float]:
    """Prefill ``count`` tasks, drain them with one in-process worker: tasks/s, and
    the process's CPU time per task (µs)."""
    await prefill(url, count, prefix)
    team = load_team(ROLES)
    start, cpu = perf(), time.process_time()
    crew = await start_workers(
        Settings(nats_url=url),
        team,
        [team.role("eng-be")],
        handlers={"eng-be": _noop},
        supervise=False,
    )
    worker = crew.workers[0]

    async def drained() -> bool:
        return worker.stats.completed >= count

    await wait_until(drained, 600)
    rate = count / (perf() - start)
    cpu_us = (time.process_time() - cpu) / count * 1e6
    await crew.stop(grace=0)
    return rate, cpu_us


async def profile_consume(url: str, *, count: int, folder: Path) -> list[Path]:
    """One consume run of the rolebus worker under pyinstrument (not measured: the
    sampler slows it down), written as text and HTML into ``folder``."""
    from pyinstrument import Profiler

    client = await connect(url)
    try:
        await reset(client)
    finally:
        await client.close()
    # Not async-aware sampling: the event loop's own stacks show where the CPU goes.
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        await _consume_with_rolebus(url, count, "profiled")
    finally:
        profiler.stop()
    folder.mkdir(parents=True, exist_ok=True)
    text, page = folder / "consume.txt", folder / "consume.html"
    text.write_text(profiler.output_text(unicode=True, show_all=False))
    page.write_text(profiler.output_html())
    return [text, page]


async def _noop(task: Task, context: Any) -> Any:
    from bench.handlers import noop

    return await noop(task, context)


# --- 3. end to end, worker in a second process -----------------------------------------------


class FollowUpClock:
    """Times publish -> follow-up stored, from the follow-ups seen on their subject."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    async def on_follow_up(self, stored: StoredMessage) -> None:
        cause = stored.headers.get("Nats-Msg-Id", "").rsplit("-", 1)[0]
        if cause in self.sent and cause not in self.seen:
            self.seen[cause] = perf()

    def latencies_ms(self) -> list[float]:
        return [(self.seen[key] - self.sent[key]) * 1000 for key in self.seen]


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return process


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _e2e_run(
    url: str,
    *,
    steady: int,
    saturation: int,
    rate: float,
    prefix: str,
    worker: list[str],
    ready: Any,
) -> tuple[float, float, float]:
    bus = await Bus.connect(Settings(nats_url=url), name="bench-e2e")
    clock = FollowUpClock()
    watch = await bus.connection.watch("task.frontend.>", clock.on_follow_up)
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(ROLES)}
    process = spawn(worker, env)
    try:
        await ready(process)
        tasks = make_tasks(steady, f"{prefix}s")
        start = perf()
        for number, task in enumerate(tasks):
            delay = start + number / rate - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            clock.sent[task.id] = perf()
            await bus.publish(SUBJECT, task)

        async def steady_done() -> bool:
            return len(clock.seen) >= steady

        await wait_until(steady_done, 120)
        latencies = clock.latencies_ms()
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        clock.sent.clear()
        clock.seen.clear()
        tasks = make_tasks(saturation, f"{prefix}x")
        start = perf()
        for task in tasks:
            clock.sent[task.id] = start
        await bus.publish_many([(SUBJECT, task) for task in tasks], window=500)

        async def all_done() -> bool:
            return len(clock.seen) >= saturation

        await wait_until(all_done, 600)
        throughput = saturation / (max(clock.seen.values()) - start)
        return p50, p99, throughput
    finally:
        stop(process)
        await watch.close()
        await bus.close()


async def bench_e2e(url: str, results: Results, *, steady: int, saturation: int, run: int) -> None:
    """rolebus, raw nats-py and raw with the same guarantee, each first in turn (run
    by run), so that none always meets the server and the disk just after another."""
    client = await connect(url)
    try:

        async def rolebus_ready(process: subprocess.Popen[str]) -> None:
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            while line and "Stop with Ctrl-C" not in line:
                line = await asyncio.to_thread(process.stdout.readline)

        async def raw_ready(process: subprocess.Popen[str]) -> None:
            assert process.stdout is not None
            await asyncio.to_thread(process.stdout.readline)

        def variant(
            prefix: str, worker: list[str], ready: Any, consumer: bool
        ) -> Callable[[], Awaitable[tuple[float, float, float]]]:
            async def measure() -> tuple[float, float, float]:
                await reset(client)  # drops the consumers too
                if consumer:
                    await raw_consumer(client, "raw-e2e")
                return await _e2e_run(
                    url,
                    steady=steady,
                    saturation=saturation,
                    rate=1000.0,
                    prefix=f"e{run}{prefix}",
                    worker=worker,
                    ready=ready,
                )

            return measure

        raw = [sys.executable, "-m", "bench.rawworker", url, "raw-e2e"]
        variants = [
            variant(
                "r",
                [str(Path(sys.executable).parent / "rolebus"), "worker", "eng-be"],
                rolebus_ready,
                consumer=False,
            ),
            variant("w", [*raw, "follow-up"], raw_ready, consumer=True),
            variant("g", [*raw, "guaranteed"], raw_ready, consumer=True),
        ]
        measured: dict[int, tuple[float, float, float]] = {}
        for index in [(run + offset) % len(variants) for offset in range(len(variants))]:
            measured[index] = await variants[index]()
        ours, theirs, guaranteed = measured[0], measured[1], measured[2]
        await reset(client)
    finally:
        await client.close()
    p50 = results.metric(
        "end to end p50 at 1,000/s",
        "ms",
        higher_is_better=False,
        target=2.0,
        note="publish -> handler -> follow-up stored; worker in a 2nd process",
    )
    p50.rolebus.append(ours[0])
    p50.baseline.append(theirs[0])
    p99 = results.metric("end to end p99 at 1,000/s", "ms", higher_is_better=False, target=3.0)
    p99.rolebus.append(ours[1])
    p99.baseline.append(theirs[1])
    rate = results.metric("end to end at saturation", "tasks/s", target=0.7)
    rate.rolebus.append(ours[2])
    rate.baseline.append(theirs[2])
    for index, (name, unit, higher) in enumerate(
        (
            ("end to end p50 at 1,000/s vs the same guarantee", "ms", False),
            ("end to end p99 at 1,000/s vs the same guarantee", "ms", False),
            ("end to end at saturation vs the same guarantee", "tasks/s", True),
        )
    ):
        same = results.metric(
            name,
            unit,
            higher_is_better=higher,
            baseline_name="raw, record + follow-up",
            note="raw: the task's record (conditional append), its follow-up, the ack",
        )
        same.rolebus.append(ours[index])
        same.baseline.append(guaranteed[index])


# --- 4. replay -------------------------------------------------------------------------------


async def fill_events(url: str, count: int, prefix: str = "ev") -> None:
    """``count`` events (ids new to the dedup window with a new ``prefix``)."""
    bus = await Bus.connect(Settings(nats_url=url), name="bench-events")
    try:
        events = [
            (
                f"event.task.{state}",
                Event(
                    id=f"{prefix}{number}",
                    state=state,
                    task_id=f"t{number // 2}",
                    role="eng-be",
                    subject=SUBJECT,
                    attempt=1,
                    detail={"title": f"Orders API endpoint {number}"},
                ),
            )
            for number in range(count)
            for state in ("completed" if number % 2 else "claimed",)
        ]
        await bus.publish_many(events, window=1000)
    finally:
        await bus.close()


async def bench_replay(url: str, results: Results, *, count: int, run: int = 0) -> None:
    """rolebus's replay against the raw ordered pull over the same events, each
    first in turn (run by run): the second reads a stream the first just warmed."""
    client = await connect(url)
    try:
        await reset(client)
        await fill_events(url, count, f"ev{run}-")

        async def ours() -> float:
            bus = await Bus.connect(Settings(nats_url=url), name="bench-replay", provision=False)
            start = perf()
            seen = 0
            async for _ in replay(bus.connection, ReplayFilter(stream=EVENTS_STREAM)):
                seen += 1
            rate = seen / (perf() - start)
            await bus.close()
            assert seen == count, f"replay read {seen} of {count}"
            return rate

        async def theirs() -> float:
            js = client.jetstream()
            info = await js.add_consumer(
                EVENTS_STREAM,
                ConsumerConfig(
                    ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, mem_storage=True
                ),
            )
            got = 0
            finished = asyncio.Event()

            async def handle(msg: Msg) -> None:
                nonlocal got
                Event.model_validate(msgpack.unpackb(msg.data))
                got += 1
                if got >= count:
                    finished.set()

            puller = RawPuller(client, EVENTS_STREAM, info.name, 1000, handle)
            start = perf()
            await puller.start()
            await asyncio.wait_for(finished.wait(), 600)
            rate = got / (perf() - start)
            await puller.stop()
            await js.delete_consumer(EVENTS_STREAM, info.name)
            return rate

        if run % 2 == 0:
            our_rate, raw_rate = await ours(), await theirs()
        else:
            raw_rate = await theirs()
            our_rate = await ours()
        metric = results.metric(
            "replay, decoded", "events/s", target=0.7, baseline_name="raw ordered pull + decode"
        )
        metric.rolebus.append(our_rate)
        metric.baseline.append(raw_rate)

        env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(ROLES)}
        command = [str(Path(sys.executable).parent / "rolebus"), "replay", "--json"]
        start = perf()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True, timeout=600)
        cli = results.metric(
            "rolebus replay --json > /dev/null",
            "events/s",
            baseline_name="raw ordered pull + decode",
            note="the whole command, start-up included; issue target 20,000/s",
        )
        cli.rolebus.append(count / (perf() - start))
        cli.baseline.append(raw_rate)
    finally:
        await client.close()


# --- 5. memory -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def acked(client: Client, consumer: str) -> int:
    """How many of the work stream's messages ``consumer`` has acked (0 until it exists)."""
    js = client.jetstream()
    try:
        info = await js.consumer_info(WORK_STREAM, consumer)
    except Exception:
        return 0
    first = (await js.stream_info(WORK_STREAM)).state.first_seq
    floor = int(info.ack_floor.stream_seq) if info.ack_floor else 0
    return max(0, floor - first + 1)


async def _peak_rss(url: str, command: list[str], count: int, progress: Any) -> list[float]:
    """RSS of the worker process at each quarter of the run, then the peak."""
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(ROLES)}
    process = spawn(command, env)
    samples: list[tuple[int, float]] = []
    try:
        deadline = time.monotonic() + 900
        while True:
            done = await progress()
            samples.append((done, rss_mb(process.pid)))
            if done >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        stop(process)
    quarters = [
        max((rss for done, rss in samples if done <= count * q / 4), default=0.0)
        for q in (1, 2, 3, 4)
    ]
    return [*quarters, max(rss for _, rss in samples)]


async def bench_memory(url: str, results: Results, *, count: int) -> dict[str, list[float]]:
    client = await connect(url)
    try:
        await reset(client)
        await prefill(url, count, "m")

        async def rolebus_progress() -> int:
            return await acked(client, "worker-eng-be")

        ours = await _peak_rss(
            url,
            [str(Path(sys.executable).parent / "rolebus"), "worker", "eng-be"],
            count,
            rolebus_progress,
        )
        await reset(client)
        await prefill(url, count, "n")
        await raw_consumer(client, "raw-mem")

        async def raw_progress() -> int:
            return await acked(client, "raw-mem")

        theirs = await _peak_rss(
            url,
            [sys.executable, "-m", "bench.rawworker", url, "raw-mem", "consume"],
            count,
            raw_progress,
        )
    finally:
        await client.close()
    metric = results.metric(
        f"worker peak RSS, {count:,} tasks",
        "MB",
        higher_is_better=False,
        baseline_name="raw nats-py worker",
        note="absolute target < 80 MB, flat",
    )
    metric.rolebus.append(ours[-1])
    metric.baseline.append(theirs[-1])
    return {"rolebus_rss_by_quarter_mb": ours[:4], "raw_rss_by_quarter_mb": theirs[:4]}


# --- 6. dashboard under load -------------------------------------------------------------------


async def bench_dashboard(url: str, results: Results, *, seconds: float) -> dict[str, Any]:
    """1,000 events/s for ``seconds`` while a client follows the board live (one
    fragment fetch per notice, like the browser), each event with the task record
    that goes with it: notices stay batched, the dashboard process's memory stays
    flat, and the board is only a refresh behind at the end."""
    import httpx

    with socket_port() as free:
        port = int(free)
    env = {**os.environ, "NATS_URL": url, "ROLEBUS_ROLES": str(REPO / "roles")}
    process = spawn(
        [str(Path(sys.executable).parent / "rolebus"), "dashboard", "--port", str(port)], env
    )
    bus = await Bus.connect(Settings(nats_url=url), name="bench-dashboard")
    samples: list[float] = []
    notices = 0
    try:
        assert process.stdout is not None
        await asyncio.to_thread(process.stdout.readline)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as web:
            await web.get("/")
            idle = rss_mb(process.pid)

            async def follow() -> None:
                nonlocal notices
                async with web.stream("GET", "/events") as stream:
                    async for line in stream.aiter_lines():
                        if line.startswith("data:"):
                            notices += 1
                            await web.get("/?fragment=1")

            follower = asyncio.create_task(follow())
            start = perf()
            sent = 0
            while perf() - start < seconds:
                target = start + sent / 1000
                delay = target - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                # What a running task writes: its record, which is its event.
                task_id = f"d{sent}"
                await bus.connection.publish_start(
                    f"event.task.completed.eng-be.{task_id}",
                    record_for(task_id),
                    msg_id=f"{task_id}_completed_0",
                )
                sent += 1
                if sent % 1000 == 0:
                    samples.append(rss_mb(process.pid))
            elapsed = perf() - start
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower

            # How far behind the live board was: the time until the last task shows.
            last = f'data-task="d{sent - 1}"'

            async def caught_up() -> bool:
                return last in (await web.get("/?fragment=1")).text

            behind = perf()
            await wait_until(caught_up, 300)
            lag = perf() - behind
    finally:
        await bus.close()
        stop(process)
    metric = results.metric(
        "dashboard RSS at 1,000 events/s",
        "MB",
        higher_is_better=False,
        baseline_name="the same process idle",
        note=f"{sent:,} events over {elapsed:.0f}s; a client following live",
    )
    metric.rolebus.append(max(samples))
    metric.baseline.append(idle)
    return {
        "dashboard_rss_each_1000_events_mb": samples,
        "dashboard_notices_per_second": notices / elapsed,
        "dashboard_seconds_behind_at_the_end": lag,
        "dashboard_events_per_second": sent / elapsed,
    }


@contextlib.contextmanager
def socket_port() -> Any:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


def codec_encode(event: Event) -> bytes:
    from rolebus.wire import codec

    return codec.encode(event)


def record_for(task_id: str) -> bytes:
    """A completed task's record, as a worker stores it."""
    from rolebus.flows.record import record_map
    from rolebus.wire import codec

    finished = datetime.now(UTC)
    return codec.encode_map(
        record_map(
            TaskState(
                task_id=task_id,
                state="completed",
                role="eng-be",
                subject=SUBJECT,
                title=f"Orders API endpoint {task_id}",
                created_at=finished - timedelta(milliseconds=3),
                updated_at=finished,
            ),
            0,
        )
    )
