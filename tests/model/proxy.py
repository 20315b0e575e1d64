"""A counting pass-through in front of the real model server: the llama.cpp server
keeps no count of what it was asked, and "paid at most once" is a count of requests."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Proxy:
    url: str = ""
    #: Every chat request's body, in the order they came.
    asked: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def counting_proxy(upstream: str) -> Iterator[Proxy]:
    """``upstream``: the real server's ``/v1`` URL; the proxy's is ``proxy.url``."""
    target = urllib.parse.urlsplit(upstream)
    proxy = Proxy()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the answer ends when the connection closes

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with proxy.lock:
                proxy.asked.append(json.loads(body))
            upstream_connection = http.client.HTTPConnection(
                target.hostname or "127.0.0.1", target.port
            )
            try:
                upstream_connection.request(
                    "POST", self.path, body, {"Content-Type": "application/json"}
                )
                answer = upstream_connection.getresponse()
                self.send_response(answer.status)
                for name in ("Content-Type",):
                    if answer.getheader(name):
                        self.send_header(name, answer.getheader(name, ""))
                self.end_headers()
                while piece := answer.read1(65536):
                    self.wfile.write(piece)
                    self.wfile.flush()
            except OSError:
                pass  # the caller went away (killed): so does this exchange
            finally:
                upstream_connection.close()

    http_server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http_server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{http_server.server_address[1]}{target.path}"
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        http_server.shutdown()
        http_server.server_close()
