"""The command handler: a program per task, JSON on stdin, a JSON outcome on stdout.

How a coding agent CLI plugs into a role (the command protocol, in the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from rolebus.handlers.base import HandlerContext, outcome_from_json
from rolebus.team.roles import CommandHandler
from rolebus.wire.messages import Outcome, Task

__all__ = ["CommandRunner"]

_STDERR_LIMIT = 4096


class CommandRunner:
    """Runs an external command per task: JSON on stdin, JSON outcome on stdout."""

    def __init__(self, spec: CommandHandler) -> None:
        self.spec = spec
        self.name = " ".join(spec.command)

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
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
                start_new_session=True,
            )
        except OSError as error:
            return Outcome.failed(f"cannot start {self.name!r}: {error}", retryable=False)
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(json.dumps(request).encode()), timeout=self.spec.timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await process.wait()
            return Outcome.failed(
                f"{self.name!r} timed out after {self.spec.timeout:g}s and was killed",
                retryable=True,
            )
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
