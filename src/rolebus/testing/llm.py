"""A real HTTP server on loopback that speaks the chat-completions API, scripted per test.

No model and no network: each request gets the next scripted :class:`Reply` (or the
default one), in whichever answer mode the request asked for (a JSON schema, a forced
tool call, or plain text), with token usage. It can refuse a mode (to test the
fallbacks), answer 429 with ``Retry-After``, fail, or answer slowly, and it keeps
every request it got (body, headers, time) for the test to check::

    async def test_my_llm_role(llm_server: LlmServer) -> None:
        llm_server.script(Reply.outcome({"status": "completed", "result": {"ok": True}}))
        ...  # a role with handler = { llm = "test-model", base_url = llm_server.url }
        assert llm_server.answered == 1
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

__all__ = ["LlmServer", "Reply", "Request", "llm_server", "serve_llm"]

MODES = frozenset({"json_schema", "json_object", "tool", "prompt"})


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    outcome: dict[str, Any] | None = None
    text: str | None = None
    status: int = 200
    retry_after: float | None = None
    delay: float = 0.0
    error: str = ""
    #: The usage the server reports (a server may lie); None: counted from the text.
    usage: dict[str, Any] | None = None
    #: Asked to stream, answer 200 and break off with nothing (llama-cpp-python does so
    #: for a request it cannot serve); the next reply answers the request asked again.
    stream_breaks: bool = False
    #: Calls of the role's tools: (name, arguments) each, instead of an answer.
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()

    @classmethod
    def calling(cls, *calls: tuple[str, dict[str, Any]]) -> Reply:
        """The model calls these tools (name, arguments) before it answers."""
        return cls(tool_calls=calls)

    @classmethod
    def with_outcome(cls, outcome: dict[str, Any], *, delay: float = 0.0) -> Reply:
        """The outcome, as the request's mode wants it (content or tool call)."""
        return cls(outcome=outcome, delay=delay)

    @classmethod
    def completed(cls, result: Any = None, **fields: Any) -> Reply:
        return cls(outcome={"status": "completed", "result": result, **fields})

    @classmethod
    def plain(cls, text: str) -> Reply:
        """Text as the message's content, whatever the mode (an invalid answer, say)."""
        return cls(text=text)

    @classmethod
    def failing(cls, status: int, *, retry_after: float | None = None, error: str = "") -> Reply:
        return cls(status=status, retry_after=retry_after, error=error or f"error {status}")


@dataclass(frozen=True)
class Request:
    """What the server received."""

    body: dict[str, Any]
    headers: dict[str, str]
    at: float  # time.monotonic() when it arrived
    mode: str
    status: int = 200

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def system(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")


@dataclass
class LlmServer:
    """The running server: ``url`` is its API base (``http://127.0.0.1:PORT/v1``)."""

    url: str = ""
    #: The modes it accepts; a request in another mode gets a 400.
    supports: set[str] = field(default_factory=lambda: set(MODES))
    default: Reply = field(default_factory=lambda: Reply.completed({"done": True}))
    #: The default answer of a model by its name (a what-if comparing two models).
    per_model: dict[str, Reply] = field(default_factory=dict)
    #: Whether it answers ``stream: true`` (server-sent events), and how slowly.
    streams: bool = True
    #: Whether a stream ends with a usage chunk when asked (llama-cpp-python's does not).
    stream_usage: bool = True
    chunk_delay: float = 0.0
    #: Streams the client closed before their end (a cancel, a timeout, a kill).
    broken_off: int = 0
    requests: list[Request] = field(default_factory=list)
    _replies: deque[Reply] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order (then with ``default``)."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def answered(self) -> int:
        """Requests answered with a completion (200): the calls that cost money."""
        return sum(1 for request in self.requests if request.status == 200)

    def _next(self, model: str = "") -> Reply:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
            return self.per_model.get(model, self.default)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _mode(body: dict[str, Any]) -> str:
    if "response_format" in body:
        kind = body["response_format"].get("type")
        return "json_object" if kind == "json_object" else "json_schema"
    if body.get("tools"):
        return "tool"
    return "prompt"


def _handler(server: LlmServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read ``requests``

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def _stream(
            self,
            body: dict[str, Any],
            mode: str,
            content: str,
            as_tool: bool,
            usage: dict[str, int],
        ) -> None:
            """The answer as server-sent events, a few characters a chunk."""

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                return {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model", "test-model"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            pieces = [content[i : i + 8] for i in range(0, len(content), 8)] or [""]
            events = []
            for number, piece in enumerate(pieces):
                if mode == "tool" and as_tool:
                    call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
                    if number == 0:
                        call.update(id="call_0", type="function")
                        call["function"]["name"] = "submit_outcome"
                    events.append(chunk({"tool_calls": [call]}))
                else:
                    events.append(chunk({"content": piece}))
            events.append(chunk({}, "stop"))
            if server.stream_usage and (body.get("stream_options") or {}).get("include_usage"):
                events.append({**chunk({}), "choices": [], "usage": usage})
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if server.chunk_delay:
                        time.sleep(server.chunk_delay)
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                with server._lock:
                    server.broken_off += 1

        def do_POST(self) -> None:
            arrived = time.monotonic()
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {name.lower(): value for name, value in self.headers.items()}
            mode = _mode(body)
            if not self.path.endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                return
            if mode not in server.supports:
                server._record(Request(body, headers, arrived, mode, 400))
                error = {"message": f"{mode} is not supported by this server", "code": 400}
                self._send(400, {"error": error}, {})
                return
            reply = server._next(str(body.get("model", "")))
            server._record(Request(body, headers, arrived, mode, reply.status))
            if reply.delay:
                time.sleep(reply.delay)
            if reply.stream_breaks and body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if reply.status != 200:
                extra = {"Retry-After": f"{reply.retry_after:g}"} if reply.retry_after else {}
                self._send(reply.status, {"error": {"message": reply.error}}, extra)
                return
            content = reply.text if reply.text is not None else json.dumps(reply.outcome)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if mode == "tool" and reply.text is None:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{len(server.requests)}",
                            "type": "function",
                            "function": {"name": "submit_outcome", "arguments": content},
                        }
                    ],
                }
            if reply.tool_calls:
                content = ""
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{len(server.requests)}_{number}",
                            "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)},
                        }
                        for number, (name, arguments) in enumerate(reply.tool_calls)
                    ],
                }
            prompt_tokens = len(json.dumps(body.get("messages", []))) // 4
            completion_tokens = max(1, len(content or "") // 4)
            usage = reply.usage or {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            if body.get("stream"):
                if not server.streams:
                    self._send(400, {"error": {"message": "stream is not supported"}}, {})
                    return
                self._stream(body, mode, content or "", reply.text is None, usage)
                return
            self._send(
                200,
                {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "test-model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
                {},
            )

    return Handler


class _Server(ThreadingHTTPServer):
    # A real server takes a hundred connections at once; the default backlog is 5.
    request_queue_size = 256


@contextlib.contextmanager
def serve_llm() -> Iterator[LlmServer]:
    """Run the server until the block ends (the fixture uses it; so can a benchmark)."""
    server = LlmServer()
    http = _Server(("127.0.0.1", 0), _handler(server))
    http.daemon_threads = True
    server.url = f"http://127.0.0.1:{http.server_address[1]}/v1"
    thread = threading.Thread(target=http.serve_forever, name="llm-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        thread.join(timeout=5)


@pytest.fixture
def llm_server() -> Iterator[LlmServer]:
    """A chat-completions server on loopback (see :mod:`rolebus.testing.llm`)."""
    with serve_llm() as server:
        yield server
