"""Command handler processes that never outlive their worker, and never run twice.

Three defences, because a SIGKILLed worker gets no chance to clean up:

- each command runs in its own process group, with a parent-death signal (Linux):
  when the worker dies, the kernel kills the command;
- each run is recorded (``<runs dir>/<task id>.json``: the group and the worker's
  pid) while it lives; a worker starting up kills the groups recorded by workers
  that are gone (what the parent-death signal cannot reach: the command's own
  children);
- before a task's command starts, a recorded run of the same task whose group is
  still alive is killed first, so a redelivery never runs beside its predecessor.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

__all__ = ["RunRecords", "die_with_parent"]

log = structlog.get_logger("rolebus.handlers")

_PR_SET_PDEATHSIG = 1
_GONE_WAIT = 5.0  # seconds to wait for a killed group to disappear


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGKILL the child when its parent
    dies (Linux only; elsewhere None, and the run records do the work)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return set_parent_death_signal


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int) -> bool:
    """SIGKILL a process group and wait (bounded) until it is gone; True if it is."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _GONE_WAIT
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
        # A killed child of ours stays a zombie until reaped: reap what we can.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-pgid, os.WNOHANG)
    return not group_alive(pgid)


class RunRecords:
    """The live command runs of one role on this machine, one file per task."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, task_id: str) -> Path:
        return self.folder / f"{task_id}.json"

    def started(self, task_id: str, pgid: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"task_id": task_id, "pgid": pgid, "worker_pid": os.getpid()}
        path = self._path(task_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record), encoding="utf-8")
        temporary.replace(path)

    def finished(self, task_id: str, pgid: int) -> None:
        path = self._path(task_id)
        if self._read(path).get("pgid") == pgid:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop_previous(self, task_id: str) -> None:
        """Kill a still-running earlier run of ``task_id`` (a redelivery must not
        start a second copy beside it)."""
        path = self._path(task_id)
        record = self._read(path)
        pgid = record.get("pgid")
        if isinstance(pgid, int) and pgid > 1 and group_alive(pgid):
            log.warning("earlier run of this task still alive; killing it", task_id=task_id)
            kill_group(pgid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def reap_orphans(self) -> int:
        """Kill the runs recorded by workers that are no longer alive; how many."""
        killed = 0
        if not self.folder.is_dir():
            return killed
        for path in sorted(self.folder.glob("*.json")):
            record = self._read(path)
            pgid, worker = record.get("pgid"), record.get("worker_pid")
            if not isinstance(pgid, int) or not isinstance(worker, int):
                continue
            if worker != os.getpid() and pid_alive(worker):
                continue  # another live worker's run (a replica on this machine)
            if pgid > 1 and group_alive(pgid):
                log.warning(
                    "killing a command its dead worker left running",
                    task_id=record.get("task_id"),
                    pgid=pgid,
                )
                kill_group(pgid)
                killed += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return killed

    @staticmethod
    def _read(path: Path) -> dict[str, object]:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}
