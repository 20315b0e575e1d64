"""The command handler: a program per task, JSON on stdin, a JSON outcome on stdout.

How a coding agent CLI plugs into a role (the command protocol, in the README). A
command never outlives its worker and never runs twice at once for one task (see
:mod:`rolebus.handlers.processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from rolebus.handlers.base import HandlerContext, outcome_from_json
from rolebus.handlers.processes import RunRecords, die_with_parent
from rolebus.team.handler_specs import CommandHandler
from rolebus.wire.messages import Outcome, Task

__all__ = ["CommandRunner"]

_STDERR_LIMIT = 4096
_CANCEL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a running task is cancelled


class CommandRunner:
    """Runs an external command per task: JSON on stdin, JSON outcome on stdout."""

    def __init__(self, spec: CommandHandler, *, runs_dir: Path | None = None) -> None:
        self.spec = spec
        self.name = " ".join(spec.command)
        #: Where live runs are recorded (a worker's; None: not recorded, e.g. rerun).
        self.runs = RunRecords(runs_dir) if runs_dir is not None else None
        # Runs in this process by task id: a redelivery while the first run still
        # goes on (say, heartbeats were lost) waits for it instead of starting another.
        self._running: dict[str, asyncio.Future[Outcome]] = {}

    def reap_orphans(self) -> int:
        """Kill the runs that workers now dead left behind (at worker start)."""
        return self.runs.reap_orphans() if self.runs is not None else 0

    async def start(self) -> None:
        """Before the first delivery: the commands a killed worker of this role left
        behind on this machine are stopped."""
        await asyncio.to_thread(self.reap_orphans)

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        running = self._running.get(task.id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._running[task.id] = future
        try:
            outcome = await self._run(task, context)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: a lone run's error is not "never retrieved"
            raise
        else:
            future.set_result(outcome)
            return outcome
        finally:
            self._running.pop(task.id, None)

    async def _run(self, task: Task, context: HandlerContext) -> Outcome:
        if self.runs is not None:
            await asyncio.to_thread(self.runs.stop_previous, task.id)
        request = {
            "task": task.model_dump(mode="json"),
            "role": {
                "id": context.role.id,
                "title": context.role.title,
                "persona": context.role.persona,
            },
            "context": context.as_json(),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                *self.spec.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own group (killed whole), and killed by the kernel if we die.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as error:
            return Outcome.failed(f"cannot start {self.name!r}: {error}", retryable=False)
        if self.runs is not None:
            self.runs.started(task.id, process.pid)
        try:
            stdout, stderr = await asyncio.wait_for(
                self._talk(process, json.dumps(request).encode(), context),
                timeout=self.spec.timeout,
            )
        except TimeoutError:
            self._kill(process.pid)
            await process.wait()
            return Outcome.failed(
                f"{self.name!r} timed out after {self.spec.timeout:g}s and was killed",
                retryable=True,
            )
        except asyncio.CancelledError:
            # The task is cancelled (or the worker stops): the command goes with it,
            # with a moment to clean up first.
            await self._terminate(process)
            raise
        finally:
            if self.runs is not None:
                self.runs.finished(task.id, process.pid)
        tail = stderr[-_STDERR_LIMIT:].decode(errors="replace").strip()
        if process.returncode != 0:
            return Outcome.failed(
                f"{self.name!r} exited with code {process.returncode}"
                + (f"; stderr: {tail}" if tail else ""),
                retryable=True,
            )
        try:
            answer = json.loads(stdout)
        except (json.JSONDecodeError, UnicodeDecodeError):
            shown = stdout[:200].decode(errors="replace")
            return Outcome.failed(
                f"{self.name!r} printed something that is not JSON: {shown!r}"
                + (f"; stderr: {tail}" if tail else ""),
                retryable=False,
            )
        return outcome_from_json(answer, source=repr(self.name))

    async def _talk(
        self, process: asyncio.subprocess.Process, request: bytes, context: HandlerContext
    ) -> tuple[bytes, bytes]:
        """Send the request; read the answer, and stderr line by line as it comes: a
        line that is a JSON object with "progress" is the command saying how it is
        getting on (the rest is kept for the error message)."""
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            process.stdin.write(request)
            await process.stdin.drain()
        process.stdin.close()
        stderr = bytearray()

        async def read_stderr() -> None:
            assert process.stderr is not None
            while True:
                try:
                    line = await process.stderr.readline()
                except ValueError:  # a line longer than the reader's limit: raw text
                    line = await process.stderr.read(_STDERR_LIMIT)
                if not line:
                    return
                report = _progress(line)
                if report is not None:
                    text, fields = report
                    await context.progress(text, **fields)
                else:
                    stderr.extend(line)
                    del stderr[: max(0, len(stderr) - _STDERR_LIMIT)]

        stdout, _ = await asyncio.gather(process.stdout.read(), read_stderr())
        await process.wait()
        return stdout, bytes(stderr)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the command's group; SIGKILL it if it is still there after the grace."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=_CANCEL_GRACE)
        except TimeoutError:
            self._kill(process.pid)
            await process.wait()

    @staticmethod
    def _kill(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _progress(line: bytes) -> tuple[str, dict[str, Any]] | None:
    """``{"progress": "text", ...}`` on a line of its own, or None."""
    if not line.lstrip().startswith(b"{"):
        return None
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or "progress" not in value:
        return None
    fields = {key: item for key, item in value.items() if key != "progress"}
    return str(value["progress"]), fields
