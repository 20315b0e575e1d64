"""The raw nats-py worker the benchmarks compare with, run as its own process.

    python -m bench.rawworker URL CONSUMER MODE

MODE ``follow-up``: decode and validate each task, publish its follow-up
(awaiting the PubAck), ack. MODE ``guaranteed``: the same with effects once, the
least code that gives it: first the task's record (one conditional append on its own
subject, which fails if the task was done already), then the follow-up, then the
ack. MODE ``consume``: decode, validate, ack.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import msgpack
import nats
from nats.aio.msg import Msg

from bench.guarantee import Bounded, append_record, history_stream
from bench.harness import RawPuller
from rolebus.wire.messages import Task


async def main(url: str, consumer: str, mode: str) -> None:
    client = await nats.connect(url)
    js = client.jetstream()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def work(msg: Msg) -> None:
        task = Task.model_validate(msgpack.unpackb(msg.data))
        if mode == "guaranteed":
            await append_record(js, task)
        if mode in ("follow-up", "guaranteed"):
            child = Task(id=f"{task.id}-1", kind="done", title="done", causation_id=task.id)
            await js.publish(
                "task.frontend.done",
                msgpack.packb(child.model_dump(mode="json")),
                headers={"Nats-Msg-Id": child.id},
            )
        await msg.ack()

    # Concurrent like the rolebus worker (64 at a time), so round trips overlap: a
    # slot is waited for before the next message is taken, so a backlog of any size
    # never runs all at once (which drowns a loop in timers and retried requests).
    bounded = Bounded(work)

    async def handle(msg: Msg) -> None:
        if mode == "consume":
            await work(msg)
            return
        await bounded(msg)

    if mode == "guaranteed":
        await history_stream(client)
    puller = RawPuller(client, "ROLEBUS_WORK", consumer, 128, handle)
    await puller.start()
    print("ready", flush=True)
    await stop.wait()
    await puller.stop()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
