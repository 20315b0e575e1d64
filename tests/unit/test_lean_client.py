"""The lean client reads received headers exactly as nats-py does."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from rolebus.nats.lean import LeanClient

BLOCKS = [
    b"Nats-Msg-Id: t-1\r\nContent-Type: application/msgpack\r\ntraceparent: 00-ab-cd-01\r\n\r\n",
    b"Name:Value\r\nName2:\tValue2 \r\n",
    b"Bad Name: skipped\r\nGood: kept\r\n",
    b"\xff\xfe: non-ascii name\r\nOk: caf\xc3\xa9 \xff\r\n",
    b"no colon here\r\n: empty name\r\n  Spaced  :  trimmed  \r\n",
    b"Twice: one\r\nTwice: two\r\n",
    b"Tab\tInside: no\r\nNats-Expected-Last-Subject-Sequence: 0\r\n",
    b"",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_headers_read_as_nats_py_reads_them(block: bytes) -> None:
    assert LeanClient._parse_header_lines(block) == Client._parse_header_lines(block)
