"""Requests answered on one wildcard subscription: answers, no responders, and a
timeout from the sweep (no timer per request)."""

from __future__ import annotations

import time

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from rolebus.nats.replies import Replies
from rolebus.nats.server import EmbeddedServer


async def test_a_request_is_answered_refused_or_timed_out(rolebus_server: EmbeddedServer) -> None:
    client = await nats.connect(rolebus_server.url)
    replies = Replies(client)
    try:

        async def echo(msg: Msg) -> None:
            await msg.respond(b"re: " + msg.data)

        async def silent(msg: Msg) -> None:
            return None

        await client.subscribe("probe.echo", cb=echo)
        await client.subscribe("probe.silent", cb=silent)
        # Many at once, each to its own future: the answers find their requests.
        pending = [
            await replies.send("probe.echo", str(n).encode(), headers={}, timeout=5.0)
            for n in range(50)
        ]
        assert [(await future).data for future in pending] == [
            f"re: {n}".encode() for n in range(50)
        ]
        with pytest.raises(nats.errors.NoRespondersError):
            await replies.request("probe.nobody", b"x", headers={}, timeout=5.0)
        started = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await replies.request("probe.silent", b"x", headers={}, timeout=0.3)
        assert time.monotonic() - started >= 0.3  # never before its time (the sweep ends it)
    finally:
        await replies.close()
        await client.close()
