"""The nats-py client, with faster header handling on both sides of the wire.

Why: every task carries headers (its Msg-Id, content type, trace) and every record
written carries four (with the compare-and-set's two). nats-py checks each
received header name character by character in a generator, and each sent one
with a regular expression and a translate; together these cost more per task
than any other step of moving it. Here a received block is decoded once and
each name checked with one regular expression, and a sent name is checked once
per client and then known. The bytes are the same (``tests/unit/test_lean_client.py``
compares the two on the shapes nats-py handles), and nothing else of the client
changes.
"""

from __future__ import annotations

import re
from typing import Any

from nats.aio.client import Client
from nats.errors import BadHeaderError, BadSubjectError

__all__ = ["LeanClient", "header_block"]

_CRLF = b"\r\n"
#: What ``bytes.strip()`` strips (``str.strip()`` strips more: \x1c-\x1f too).
_BYTES_WHITESPACE = " \t\n\r\x0b\x0c"
#: A header name after stripping: no whitespace inside (nats-py skips such lines;
#: ``\s`` in a str pattern is ``str.isspace``, what nats-py checks).
_NAME_WITH_SPACE = re.compile(r"\s")
#: The characters a sent header name may have (RFC 7230 tokens, as nats-py checks).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: Past this many distinct names, new ones are checked every time (a bound on the set).
_KNOWN_NAMES_LIMIT = 256


def header_block(headers: dict[str, Any], known: set[str]) -> bytes:
    """The ``NATS/1.0`` header block nats-py would send for ``headers``: names
    stripped and checked (once: a good one joins ``known``), empty ones skipped,
    values stripped with their line breaks made spaces."""
    lines = ["NATS/1.0\r\n"]
    for raw_name, raw_value in headers.items():
        name = raw_name.strip()
        if name not in known:
            if not name:
                continue
            if _HEADER_NAME.fullmatch(name) is None:
                raise BadHeaderError(name)
            if len(known) < _KNOWN_NAMES_LIMIT:
                known.add(name)
        value = raw_value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


class LeanClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self._known_header_names: set[str] = set()

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        try:
            text = raw.decode("ascii")  # one decode for the block, not two a line
        except UnicodeDecodeError:
            return Client._parse_header_lines(raw)  # rare: nats-py's own, byte by byte
        out: dict[str, str] = {}
        for line in text.split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip(_BYTES_WHITESPACE)
            if _NAME_WITH_SPACE.search(name) is not None:
                continue
            out[name] = value.strip(_BYTES_WHITESPACE)
        return out

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        if headers is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if subject == "":
            raise BadSubjectError
        block = header_block(headers, self._known_header_names)
        size = len(block)
        command = b"".join(
            (
                f"HPUB {subject} {reply} {size} {size + payload_size}\r\n".encode(),
                block,
                payload,
                _CRLF,
            )
        )
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()
