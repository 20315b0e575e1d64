"""One attempt of a handler on a claimed item: its context, its cancellation, and
what its failures are. What it answers is decided by :mod:`rolebus.flows.answers`.

Failure classes: the bus's own budget gate asks (a breach, with the amounts the bus
computed); a rolebus error inside the handler (a bad role file, a tool that cannot
be loaded) is permanent; any other exception is the handler's bug, retried; a
``rolebus cancel`` stops it and says so. The worker stopping is not a failure: the
attempt is cut off and the delivery comes again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import structlog

from rolebus.errors import RolebusError
from rolebus.flows.answered import BreachAsked, CancelRequested
from rolebus.flows.answers import Answered
from rolebus.flows.brakes import BrakeCheck
from rolebus.flows.budgets import BudgetLedger, TaskBudget
from rolebus.flows.calls import CallStore
from rolebus.flows.contracts import ContractRegistry
from rolebus.flows.effects import publish_event
from rolebus.flows.intake import Item
from rolebus.flows.limits import RateLimiter
from rolebus.flows.progress import ProgressReporter
from rolebus.flows.record import State, TaskState
from rolebus.handlers.base import BudgetBreachError, Handler, HandlerContext
from rolebus.nats.connection import Connection
from rolebus.nats.delivery import InboundMessage
from rolebus.nats.publish import PendingPublish
from rolebus.team.handler_specs import LlmHandler
from rolebus.team.roles import RoleSpec, Team
from rolebus.wire.headers import Header
from rolebus.wire.messages import Decision, Event, Outcome
from rolebus.wire.subjects import note_subject
from rolebus.worker.notices import ClaimedNotices

__all__ = ["Attempts"]

log = structlog.get_logger("rolebus.worker.loop")


class Attempts:
    """Runs a role's handler, one attempt per call, with what it needs."""

    def __init__(
        self,
        connection: Connection,
        role: RoleSpec,
        team: Team,
        handler: Handler,
        *,
        calls: CallStore,
        budgets: BudgetLedger,
        contracts: ContractRegistry,
        claimed_after: float,
    ) -> None:
        self.connection = connection
        self.role = role
        self.team = team
        self.handler = handler
        self.calls = calls
        self.budgets = budgets
        self.contracts = contracts
        self.notices = ClaimedNotices(claimed_after)
        self.brakes = BrakeCheck(role)
        #: Tasks ``rolebus cancel`` asked to stop (task id -> reason), and the ones
        #: running now (task id -> the slot's asyncio task running its handler).
        self.cancelled: dict[str, str] = {}
        self._running: dict[str, asyncio.Task[Any]] = {}
        # Only roles that spend get a budget gate per task (none on the hot path).
        self._gated = role.budget.capped or isinstance(role.handler, LlmHandler)
        self.limiter = (
            RateLimiter(
                connection,
                model=role.handler.llm,
                base_url=role.handler.base_url,
                rpm=role.handler.rpm,
                tpm=role.handler.tpm,
                max_pause=role.handler.max_retry_after,
            )
            if isinstance(role.handler, LlmHandler) and (role.handler.rpm or role.handler.tpm)
            else None
        )
        self._log = log.bind(role=role.id)

    def cancel_requested(self, task_id: str, reason: str) -> None:
        """``rolebus cancel`` asked: skip the task when it comes, stop it if it runs."""
        self.cancelled[task_id] = reason
        running = self._running.get(task_id)
        if running is not None:
            running.cancel()

    async def run(self, message: InboundMessage, item: Item, state: TaskState) -> Answered:
        """Run the handler on ``item``; what it answered."""
        trace = message.headers.get(Header.TRACEPARENT)

        def publish_claimed() -> Awaitable[PendingPublish]:
            subject, event = self._claimed_note(item, message)
            return publish_event(self.connection, event, trace=trace, subject=subject)

        self.notices.begin(message, publish_claimed)
        task_id = item.task.id
        answered: Answered
        try:
            context = await self._context(message, item, state)
            if (running := asyncio.current_task()) is not None:
                self._running[task_id] = running
            answered = await self.handler(item.task, context)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task_id not in self.cancelled or current is None or current.uncancel():
                raise  # the worker stops: not a cancel request
            answered = CancelRequested(f"cancelled: {self.cancelled.get(task_id, '')}")
        except BudgetBreachError as error:  # the bus's own gate: it asks, with its amounts
            answered = BreachAsked(error.request, error.usage)
        except RolebusError as error:
            answered = Outcome.failed(error.message, retryable=False)
        except Exception as error:  # a handler's bug is a retryable failure, not ours
            self._log.warning("handler raised", task_id=task_id, error=repr(error))
            answered = Outcome.failed(f"handler raised {type(error).__name__}: {error}")
        finally:
            self._running.pop(task_id, None)
        await self.notices.end(message)
        return answered

    async def _context(
        self, message: InboundMessage, item: Item, state: TaskState
    ) -> HandlerContext:
        task = item.task
        return HandlerContext(
            role=self.role,
            subject=state.subject,
            attempt=message.delivered,
            decisions=[Decision.model_validate(d) for d in state.detail.get("decisions", [])],
            contracts=await self.contracts.resolve(task.payload.get("contracts")),
            extra={"input": item.kind},
            team=self.team,
            previous_error=state.previous_error,
            generation=state.failures,
            calls=self.calls,
            budget=TaskBudget(
                self.budgets,
                self.role,
                task.id,
                flow_tokens=self.brakes.tokens_for(task),
                flow_usd=self.brakes.usd_for(task),
            )
            if self._gated
            else None,
            progress_sink=ProgressReporter(self.connection, self.role.id, task, message),
            limiter=self.limiter,
        )

    def _claimed_note(self, item: Item, message: InboundMessage) -> tuple[str, Event]:
        """A note that this attempt runs (for a watcher), and where it goes."""
        task = item.task
        number = f"{message.stream_seq}-{message.delivered}"
        return note_subject(State.CLAIMED, self.role.id, task.id, number), Event(
            id=f"{task.id}_claimed_{message.stream_seq}_{message.delivered}",
            state=State.CLAIMED,
            task_id=task.id,
            role=self.role.id,
            subject=message.subject,
            attempt=message.delivered,
            correlation_id=task.flow_id,
            causation_id=task.id,
            detail={"input": item.kind, "title": task.title},
        )
