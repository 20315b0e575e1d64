"""What keeps another web page, or another name for this host, from using the dashboard.

- Only the host names it serves are answered: a page under ``attacker.example`` that
  resolves to 127.0.0.1 (DNS rebinding) gets a refusal, not the page and its token.
- A request that changes something (POST) must come from the dashboard's own origin
  (``Origin``, else ``Referer``), and carry the CSRF token bound to this browser's
  cookie (``rolebus_csrf``, SameSite=Strict): another site can neither read the token
  nor send the cookie.
- Every answer says: no framing, scripts from the dashboard only, no referrer abroad.
"""

from __future__ import annotations

import hmac
import secrets
import urllib.parse
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSRF_COOKIE", "LOOPBACK", "BrowserGuard", "csrf_of", "csrf_ok"]

CSRF_COOKIE = "rolebus_csrf"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'; form-action 'self'",
    ),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
]


def csrf_of(request: Request) -> str:
    """This browser's CSRF token (what its forms carry)."""
    return str(request.scope.get("state", {}).get("csrf", ""))


def csrf_ok(request: Request, given: str) -> bool:
    """The form's token is this browser's (the cookie the request came with)."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(given, cookie)


def _host(value: str) -> str:
    """A Host header's name, without the port ("[::1]:8765" -> "[::1]")."""
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class BrowserGuard:
    """ASGI middleware: the host allow list, the origin check, the CSRF cookie, headers."""

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(host.lower() for host in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "")
        if _host(host).lower() not in self.hosts:
            refusal = Response(
                f"unknown host {host!r}: this dashboard answers to {', '.join(sorted(self.hosts))}"
                " (add a name with `rolebus dashboard --allow-host NAME`)",
                status_code=400,
            )
            await self._send(refusal, scope, receive, send, new_cookie=None)
            return
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin") or request.headers.get("referer") or ""
            if urllib.parse.urlsplit(origin).netloc.lower() != host.lower():
                refusal = Response(
                    "cross-origin request refused: it must come from this dashboard's pages",
                    status_code=403,
                )
                await self._send(refusal, scope, receive, send, new_cookie=None)
                return
        cookie = request.cookies.get(CSRF_COOKIE)
        new_cookie = None if cookie else secrets.token_hex(16)
        scope.setdefault("state", {})["csrf"] = cookie or new_cookie
        await self._send(self.app, scope, receive, send, new_cookie=new_cookie)

    @staticmethod
    async def _send(
        app: ASGIApp, scope: Scope, receive: Receive, send: Send, *, new_cookie: str | None
    ) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += _HEADERS
                if new_cookie is not None:
                    headers.append(
                        (
                            b"set-cookie",
                            f"{CSRF_COOKIE}={new_cookie}; Path=/; HttpOnly; "
                            "SameSite=Strict".encode(),
                        )
                    )
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, with_headers)
