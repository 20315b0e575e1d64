"""``rolebus dashboard``: the team's live board in a browser (an ASGI app).

Pages: the team board (one column per role, task cards by state, backlog, in
flight, dead letters, SLO status), a task's causal tree, the escalation inbox
(answer in one click), contracts with their diffs, and the event stream with the
equivalent ``rolebus replay`` command. Everything is served from this process:
no CDN, no build step. Every user-supplied string is escaped.

Safety: bound to loopback unless ``--host`` is given, and then a token is
required (``?token=`` once, kept in a cookie); forms carry a CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.errors import RolebusError, SubjectError
from rolebus.flows.calls import CallStore
from rolebus.flows.cancels import cancel
from rolebus.flows.contracts import ContractRegistry, ContractVersion, diff
from rolebus.flows.escalation import EscalationStore, resolve
from rolebus.flows.record import TaskState
from rolebus.flows.state import StateStore
from rolebus.history.flow import read_flow
from rolebus.history.projection import TaskProjection
from rolebus.history.replay import ReplayFilter, flow_states, replay
from rolebus.history.status import AttemptCounts, collect
from rolebus.history.usage import UsageLedger
from rolebus.nats.delivery import StoredMessage
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import RoleSpec, Team
from rolebus.web.charts import role_charts
from rolebus.web.flowsvg import render_flow
from rolebus.web.guard import LOOPBACK, BrowserGuard, csrf_of, csrf_ok
from rolebus.web.pages import LIVE_JS, model_calls, page, slo_cell, task_card, version_row
from rolebus.web.pages import escape as _e  # short: it wraps every value in the templates
from rolebus.web.whatifpage import kept_run, kept_runs
from rolebus.wire.messages import Event
from rolebus.wire.subjects import EVENTS_STREAM, validate_token

__all__ = ["Board", "create_app"]

log = structlog.get_logger(__name__)

_CARDS = 50  # per role on the board, newest first
_WINDOW = 3600.0  # seconds the board's counts and charts look back


def _spends(role: RoleSpec) -> bool:
    """Whether a role's charts include model spend."""
    return isinstance(role.handler, LlmHandler) or role.budget.capped


class Board:
    """The board's data (every task's state, every role's status over the last
    hour), refreshed in the background after events arrive, never by a page view.

    Reading it replays up to an hour of events: once per view, at 1,000 events/s,
    views fell behind the live stream and the process grew to 1 GB (the benchmark).
    A refresh now waits at least twice as long as the last one took, so it never
    takes the process over, and each finished refresh is one notice to the pages
    (SSE): however many events happened, memory stays flat."""

    def __init__(self, load: Callable[[], Awaitable[Any]]) -> None:
        self._load = load
        self.data: Any = None
        self.version = 0
        self.changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._wake.set()  # the first load
        self._ready = asyncio.Event()

    async def on_event(self, _: StoredMessage) -> None:
        self._wake.set()

    async def current(self, timeout: float = 20.0) -> Any:
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self.data

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = time.monotonic()
            try:
                self.data = await self._load()
            except RolebusError as error:
                log.warning("board refresh failed; retrying", error=error.message)
                self._wake.set()
                await asyncio.sleep(1.0)
                continue
            self.version += 1
            self._ready.set()
            self.changed.set()
            await asyncio.sleep(max(0.25, 2 * (time.monotonic() - started)))


def _changes(old: ContractVersion, new: ContractVersion) -> list[str]:
    breaking, compatible = diff(old.document, new.document)
    return [*breaking, *compatible]


def create_app(
    settings: Settings,
    team: Team,
    *,
    token: str | None = None,
    hosts: Iterable[str] = LOOPBACK,
) -> Starlette:
    """The dashboard app. ``token``: required on every request when set; ``hosts``:
    the host names it answers to (see :mod:`rolebus.web.guard`)."""
    state: dict[str, Any] = {}

    def connection() -> Any:
        return state["bus"].connection

    async def load_board() -> tuple[dict[str, list[TaskState]], dict[str, Any]]:
        # Both read only what was written since the last refresh.
        found = await collect(
            connection(), team, counts=counts, records=records, ledger=ledger, window=_WINDOW
        )
        cards = {role.id: records.cards(role.id) for role in team}
        return cards, {status.role: status for status in found}

    counts = AttemptCounts(window=_WINDOW)
    records = TaskProjection((role.id for role in team), cards=_CARDS, window=_WINDOW)
    ledger = UsageLedger()
    live = Board(load_board)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bus = await Bus.connect(settings, name="rolebus-dashboard")
        state["bus"] = bus
        watch = await bus.connection.watch("event.>", live.on_event)
        refresher = asyncio.create_task(live.run())
        try:
            yield
        finally:
            refresher.cancel()
            # Bounded: a stop must end even if a refresh does not (a cancel lost in
            # a read, a server gone).
            await asyncio.wait({refresher}, timeout=5.0)
            if not refresher.done():
                log.warning("the board's refresh did not stop within 5 s; leaving it")
            await watch.close()
            await bus.close()

    async def board(request: Request) -> Response:
        try:
            cards_by_role, statuses = await live.current()
        except TimeoutError:
            return HTMLResponse("the board is still loading: reload in a moment", 503)
        columns = []
        now = datetime.now(UTC)
        for role in team:
            status = statuses[role.id]
            cards = cards_by_role[role.id]
            slo = "".join(
                f"<div class='muted'>{_e(name)}: {slo_cell(check)}</div>"
                for name, check in status.slo.items()
                if check["target"] is not None
            )
            charts = role_charts(
                status, now=now, window=_WINDOW, spends=_spends(role), size=(200, 72)
            )
            columns.append(
                f'<section class="column" data-role="{_e(role.id)}"><h3>'
                f'<a href="/roles/{_e(role.id)}">{_e(role.id)}</a></h3>'
                f'<div class="muted">{_e(role.title)}</div>'
                f"<div>backlog {status.backlog} · in flight {status.in_flight} · "
                f"dead {status.dead_letters}</div>{slo}{charts}"
                + "".join(task_card(card) for card in cards)
                + "</section>"
            )
        body = f'<div class="board">{"".join(columns)}</div>'
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return page("Team board", body, live=True)

    async def role_page(request: Request) -> Response:
        role = team.roles.get(request.path_params["role"])
        if role is None:
            return page("Not found", f"<p>No role {_e(request.path_params['role'])}.</p>")
        try:
            _, statuses = await live.current()
        except TimeoutError:
            return HTMLResponse("the board is still loading: reload in a moment", 503)
        status = statuses[role.id]
        slo = "".join(
            f"<li>{_e(name)}: {slo_cell(check)}</li>"
            for name, check in status.slo.items()
            if check["target"] is not None
        )
        charts = role_charts(
            status, now=datetime.now(UTC), window=_WINDOW, spends=_spends(role), size=(1200, 150)
        )
        body = (
            f'<div class="card" data-role="{_e(role.id)}"><b>{_e(role.title)}</b> · reports to '
            f"{_e(role.reports_to or 'nobody')} · backlog {status.backlog} · in flight "
            f"{status.in_flight} · completed in the last hour {status.completed} · dead letters "
            f"{status.dead_letters} · open escalations {status.open_escalations}"
            f"<ul>{slo}</ul></div>{charts}<p class='muted'>The same points: "
            f"<code>rolebus status --json</code> (series, marks, spend_hours).</p>"
        )
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return page(f"Role {role.id}", body, live=True)

    async def task_page(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            stored = await StateStore(connection()).get(validate_token(task_id, what="task id"))
        except SubjectError:
            stored = None
        if stored is None:
            return page("Not found", f"<p>No task {_e(task_id)}.</p>")
        root = stored.state
        flow = await flow_states(connection(), root.correlation_id or root.task_id)
        events = [
            item.message
            async for item in replay(
                connection(),
                ReplayFilter(stream=EVENTS_STREAM, correlation=root.correlation_id or root.task_id),
            )
            if isinstance(item.message, Event)
        ]
        rows = "".join(
            f"<tr><td>{_e(e.at.strftime('%H:%M:%S.%f')[:-3])}</td><td>{_e(e.role)}</td>"
            f"<td>{_e(e.entity)}.{_e(e.state)}</td><td><a href='/tasks/{_e(e.task_id)}'>"
            f"{_e(e.task_id)}</a></td><td>{_e(e.detail.get('title') or e.error or '')}</td></tr>"
            for e in events
        )
        items = "".join(f"<li>{task_card(s)}</li>" for s in flow)
        picture = render_flow(
            await read_flow(connection(), team, root.correlation_id or root.task_id)
        )
        calls = await CallStore(connection()).for_task(root.task_id)
        cancel_form = (
            ""
            if root.terminal
            else f'<form method="post" action="/tasks/{_e(root.task_id)}/cancel">'
            f'<input type="hidden" name="csrf" value="{csrf_of(request)}">'
            '<input name="reason" placeholder="why (optional)">'
            '<button name="tree" value="">Cancel</button>'
            '<button name="tree" value="1">Cancel with what it caused</button></form>'
        )
        body = (
            f"{task_card(root)}{cancel_form}<p class='muted'>attempts: {root.attempt}; result: "
            f"{_e(json.dumps(root.result, default=str))}</p><h2>Flow</h2>"
            f'<div class="flow-wrap">{picture}</div><div id="detail" class="card muted">'
            "Click a box for its details.</div>"
            f"<details><summary>Work items ({len(flow)})</summary><ul>{items}</ul></details>"
            + (f"<h2>Model calls</h2>{model_calls(calls)}" if calls else "")
            + f"<h2>Timeline</h2><table>{rows}</table>"
        )
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return page(f"Task {task_id}", body, live=True)

    async def escalations_page(request: Request) -> Response:
        records = [r for r in await EscalationStore(connection()).all() if r.status == "open"]
        forms = []
        for record in sorted(records, key=lambda r: r.opened_at):
            action = f"/escalations/{_e(record.id)}/resolve"
            csrf = f'<input type="hidden" name="csrf" value="{csrf_of(request)}">'
            verdict = "approve" if record.kind == "approval" else "answer"
            # Each option is one click: its name is the decision (approved, for an approval).
            options = "".join(
                f'<form method="post" action="{action}">{csrf}'
                f'<input type="hidden" name="verdict" value="{verdict}">'
                f'<button class="option" name="decision" value="{_e(o.name)}">'
                f"<b>{_e(o.name)}</b><br><span class='muted'>{_e(o.tradeoffs)}</span>"
                "</button></form>"
                for o in record.options
            )
            verdicts = (
                f'<form method="post" action="{action}">{csrf}'
                '<input name="decision" placeholder="why (optional)"> '
                '<button name="verdict" value="approve">Approve</button>'
                '<button name="verdict" value="reject">Reject</button></form>'
                if record.kind == "approval"
                else f'<form method="post" action="{action}">{csrf}'
                '<input name="decision" required placeholder="or answer in words"> '
                '<button name="verdict" value="answer">Answer</button></form>'
            )
            forms.append(
                f'<div class="card" data-escalation="{_e(record.id)}">'
                f"<b>{_e(record.asking_role)} asks {_e(record.current_holder(team))}</b> "
                f"({_e(record.reason)}): {_e(record.question)}"
                + (f'<div class="options">{options}</div>' if options else "")
                + f"{verdicts}</div>"
            )
        body = "".join(forms) or "<p>No open escalations.</p>"
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return page("Escalation inbox", body, live=True)

    async def resolve_escalation(request: Request) -> Response:
        # The inbox form is urlencoded; parsed here rather than pulling in multipart.
        fields = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        form = {key: values[0] for key, values in fields.items()}
        if not csrf_ok(request, str(form.get("csrf", ""))):
            return Response("missing or wrong CSRF token", status_code=403)
        verdict = str(form.get("verdict", "answer"))
        approved = {"approve": True, "reject": False}.get(verdict)
        decision = str(form.get("decision", "")).strip()
        if not decision and approved is not None:
            decision = "approved" if approved else "rejected"
        try:
            await resolve(
                connection(),
                team,
                request.path_params["escalation_id"],
                decision=decision,
                approved=approved,
            )
        except RolebusError as error:
            return page("Could not resolve", f"<p>{_e(error.message)}</p><p>{_e(error.hint)}</p>")
        return RedirectResponse("/escalations", status_code=303)

    async def cancel_task(request: Request) -> Response:
        fields = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        form = {key: values[0] for key, values in fields.items()}
        if not csrf_ok(request, str(form.get("csrf", ""))):
            return Response("missing or wrong CSRF token", status_code=403)
        task_id = request.path_params["task_id"]
        try:
            await cancel(
                connection(),
                validate_token(task_id, what="task id"),
                reason=str(form.get("reason", "")) or "cancelled from the dashboard",
                tree=bool(form.get("tree")),
                team=team,
            )
        except RolebusError as error:
            return page("Could not cancel", f"<p>{_e(error.message)}</p><p>{_e(error.hint)}</p>")
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    async def script(request: Request) -> Response:
        return Response(LIVE_JS, media_type="text/javascript")

    async def contracts_page(request: Request) -> Response:
        registry = ContractRegistry(connection(), team=team)
        picked = request.query_params
        sections = []
        for name in await registry.names():
            versions = await registry.versions(name)
            by_version = {version.document.version: version for version in versions}
            rows = "".join(version_row(version) for version in versions)
            diffs = "".join(
                f"<li>{_e(a.document.version)} → {_e(b.document.version)}: "
                f"{_e('; '.join(_changes(a, b)) or 'no changes')}</li>"
                for a, b in itertools.pairwise(versions)
            )
            # Any two versions: ?name=orders-api&from=1.0.0&to=2.0.0
            chosen = ""
            old, new = by_version.get(picked.get("from", "")), by_version.get(picked.get("to", ""))
            if picked.get("name") == name and old is not None and new is not None:
                lines = "".join(f"<li>{_e(line)}</li>" for line in _changes(old, new))
                chosen = (
                    f'<div class="card" data-diff="{_e(name)}"><b>{_e(old.document.version)}'
                    f" → {_e(new.document.version)}</b><ul>{lines or '<li>no changes</li>'}"
                    "</ul></div>"
                )
            options = "".join(f"<option>{_e(v)}</option>" for v in by_version)
            form = (
                f'<form><input type="hidden" name="name" value="{_e(name)}">'
                f'<select name="from">{options}</select> → <select name="to">{options}'
                "</select> <button>Diff</button></form>"
            )
            sections.append(
                f"<h2>{_e(name)}</h2><table><tr><th>version</th><th>by</th>"
                f"<th>accepted by</th><th>changes requested</th></tr>{rows}</table>"
                f"<ul>{diffs}</ul>{form}{chosen}"
            )
        return page("Contracts", "".join(sections) or "<p>No contracts yet.</p>")

    async def whatif_runs(request: Request) -> Response:
        return page("What-if runs", kept_runs(settings.home))

    async def whatif_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return page(f"What-if run {run_id}", kept_run(settings.home, run_id))

    async def stream_page(request: Request) -> Response:
        role = request.query_params.get("role") or None
        subject = request.query_params.get("subject") or None
        correlation = request.query_params.get("correlation") or None
        wanted = ReplayFilter(
            stream=EVENTS_STREAM, role=role, subject=subject, correlation=correlation
        )
        items = [item async for item in replay(connection(), wanted, team=team)][-200:]
        rows = "".join(
            f"<tr><td>{item.stored.seq}</td><td>{_e(item.stored.subject)}</td>"
            f"<td>{_e(getattr(item.message, 'role', ''))}</td>"
            f"<td>{_e(getattr(item.message, 'task_id', ''))}</td></tr>"
            for item in reversed(items)
        )
        command = "rolebus replay" + "".join(
            f" --{flag} {value}"
            for flag, value in (("role", role), ("subject", subject), ("correlation", correlation))
            if value
        )
        body = (
            f'<form><input name="role" placeholder="role" value="{_e(role or "")}">'
            f'<input name="subject" placeholder="subject" value="{_e(subject or "")}">'
            f'<input name="correlation" placeholder="correlation" value="{_e(correlation or "")}">'
            f"<button>Filter</button></form><p><code id='command'>{_e(command)}</code> "
            '<button type="button" data-copy="command">Copy</button></p>'
            f"<table><tr><th>seq</th><th>subject</th><th>role</th><th>task</th></tr>{rows}</table>"
        )
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return page("Event stream", body, live=True)

    async def events(request: Request) -> Response:
        async def notices() -> AsyncIterator[str]:
            seen = live.version
            yield ": connected\n\n"
            while True:
                live.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(live.changed.wait(), timeout=15)
                if live.version != seen:
                    seen = live.version
                    yield f"data: {seen}\n\n"
                else:
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)  # batch: at most two notices a second

        return StreamingResponse(notices(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/", board),
            Route("/tasks/{task_id}", task_page),
            Route("/roles/{role}", role_page),
            Route("/escalations", escalations_page),
            Route("/escalations/{escalation_id}/resolve", resolve_escalation, methods=["POST"]),
            Route("/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
            Route("/contracts", contracts_page),
            Route("/stream", stream_page),
            Route("/whatif", whatif_runs),
            Route("/whatif/{run_id}", whatif_page),
            Route("/events", events),
            Route("/static/live.js", script),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(BrowserGuard, hosts=hosts),
            *([Middleware(TokenGuard, token=token)] if token is not None else []),
        ],
    )


class TokenGuard:
    """Every request needs the token: ``?token=`` once (then kept in a cookie)."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token") or request.cookies.get("rolebus_token")
        if not given or not hmac.compare_digest(given, self.token):
            await Response("a token is required (?token=...)", status_code=401)(
                scope, receive, send
            )
            return
        if request.query_params.get("token"):
            response = RedirectResponse(str(request.url.remove_query_params("token")))
            response.set_cookie("rolebus_token", self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
