"""The lean client reads received headers exactly as nats-py does."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.errors import BadHeaderError

from rolebus.nats.lean import LeanClient

BLOCKS = [
    b"Nats-Msg-Id: t-1\r\nContent-Type: application/msgpack\r\ntraceparent: 00-ab-cd-01\r\n\r\n",
    b"Name:Value\r\nName2:\tValue2 \r\n",
    b"Bad Name: skipped\r\nGood: kept\r\n",
    b"\xff\xfe: non-ascii name\r\nOk: caf\xc3\xa9 \xff\r\n",
    b"no colon here\r\n: empty name\r\n  Spaced  :  trimmed  \r\n",
    b"Twice: one\r\nTwice: two\r\n",
    b"Tab\tInside: no\r\nNats-Expected-Last-Subject-Sequence: 0\r\n",
    b"Sep\x1cInside: no\r\nTrail\x1c: no\r\nValue: kept\x1c \r\n\x0bLead: yes\r\n",
    b"Lone\nbreak: inside\r\nColon: a:b:c\r\n:\r\n",
    b"",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_headers_read_as_nats_py_reads_them(block: bytes) -> None:
    assert LeanClient._parse_header_lines(block) == Client._parse_header_lines(block)


SENT = [
    {"Nats-Msg-Id": "t-1", "Content-Type": "application/msgpack"},
    {
        "Nats-Msg-Id": "t-1_completed_0",
        "Nats-Expected-Last-Subject-Sequence": "0",
        "Nats-Expected-Last-Subject-Sequence-Subject": "event.task.*.eng-be.t-1",
    },
    {" Padded ": "  value with spaces  ", "": "skipped", "Break": "one\r\ntwo\nthree"},
    {"Unicode": "café ☕"},
    {},
]


class _Captured:
    """What a client would write to the socket for one publish."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    async def send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.commands.append(cmd)


async def _sent(client: Client, headers: dict[str, str]) -> list[bytes]:
    captured = _Captured()
    client._send_command = captured.send_command  # type: ignore[method-assign]
    client._flush_queue = None
    await client._send_publish("task.backend.build", "_INBOX.x.1", b"\x81\xa1a\x01", 4, headers)
    return captured.commands


@pytest.mark.parametrize("headers", SENT)
async def test_headers_sent_as_nats_py_sends_them(headers: dict[str, str]) -> None:
    lean = LeanClient()
    assert await _sent(lean, headers) == await _sent(Client(), headers)
    # The second time, with the names known, is the same bytes too.
    assert await _sent(lean, headers) == await _sent(Client(), headers)


@pytest.mark.parametrize("name", ["Bad Name", "Colon:", "Semi;colon", 'Quote"'])
async def test_a_bad_header_name_is_refused_as_nats_py_refuses_it(name: str) -> None:
    with pytest.raises(BadHeaderError):
        await _sent(Client(), {name: "x"})
    with pytest.raises(BadHeaderError):
        await _sent(LeanClient(), {name: "x"})
