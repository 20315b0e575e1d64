"""The nats-py client, with a faster reading of received messages' headers.

Why: every delivered task carries headers (its Msg-Id, content type, trace), and
nats-py checks each header name character by character in a generator, which
costs more per delivered task than any other step of reading it. The names are
checked here with one regular expression instead; the result is the same
(``tests/unit/test_lean_client.py`` compares the two on the shapes nats-py
handles), and nothing else of the client changes.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

__all__ = ["LeanClient"]

_CRLF = b"\r\n"
#: A header name after stripping: no whitespace inside (nats-py skips such lines).
_NAME_WITH_SPACE = re.compile(rb"\s")


class LeanClient(Client):
    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip()
            if _NAME_WITH_SPACE.search(name) is not None:
                continue
            try:
                key = name.decode("ascii")
            except UnicodeDecodeError:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out
