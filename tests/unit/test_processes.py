"""Run records of command handlers: what a starting worker kills, and what it leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rolebus.handlers.processes import RunRecords, group_alive


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_orphans_of_dead_workers_are_killed_and_live_workers_runs_are_left(
    tmp_path: Path,
) -> None:
    records = RunRecords(tmp_path)
    orphan, others = sleeper(), sleeper()
    live_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "a.json").write_text(
            json.dumps({"task_id": "a", "pgid": orphan.pid, "worker_pid": dead_pid()})
        )
        (tmp_path / "b.json").write_text(
            json.dumps({"task_id": "b", "pgid": others.pid, "worker_pid": live_worker.pid})
        )
        assert records.reap_orphans() == 1
        orphan.wait(timeout=5)
        assert not group_alive(orphan.pid)
        assert group_alive(others.pid)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["b.json"]
    finally:
        for process in (orphan, others, live_worker):
            process.kill()
            process.wait()


def test_a_tasks_earlier_run_is_killed_before_the_next_starts(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    earlier = sleeper()
    try:
        records.started("t1", earlier.pid)
        records.stop_previous("t1")
        earlier.wait(timeout=5)
        assert not group_alive(earlier.pid)
        assert not (tmp_path / "t1.json").exists()
    finally:
        earlier.kill()
        earlier.wait()


def test_a_finished_run_removes_only_its_own_record(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    records.started("t1", 12345)
    records.finished("t1", 999)  # another run's finish: not ours to remove
    assert (tmp_path / "t1.json").exists()
    records.finished("t1", 12345)
    assert not (tmp_path / "t1.json").exists()
