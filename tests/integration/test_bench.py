"""The benchmark harness keeps working: run `make bench-quick`'s code path once.

No timing is asserted (the machine's speed is not the test's business); only that
every case ran, measured both sides, and wrote its results."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..conftest import REPO


def run_bench(*options: str, output: Path) -> tuple[str, dict[str, Any]]:
    """``python -m bench --quick OPTIONS``: its output and its results file."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *options, "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(output.read_text())


def test_bench_quick_measures_every_case_against_its_baseline(tmp_path: Path) -> None:
    stores_before = set(Path(tempfile.gettempdir()).glob("rolebus-bench-*"))
    printed, results = run_bench(output=tmp_path / "results.json")
    # Its server's store (hundreds of MB after a full run) is not left behind.
    assert set(Path(tempfile.gettempdir()).glob("rolebus-bench-*")) <= stores_before
    metrics = results["metrics"]
    assert {
        "publish, an ack each",
        "consume vs raw with the same guarantee",
        "consume vs FastStream with the same guarantee",
        "stored writes per task, worker side, no follow-up",
        "worker CPU per task at saturation",
        "end to end at saturation",
        "replay, decoded",
        "layout: per-task subject of the history, role token",
        "stored bytes per recorded call, after a role's first (example LLM team)",
        "20 concurrent 1 s model calls on one worker (wall time)",
        "LLM task, one at a time, vs the same guarantee",
    } <= set(metrics)
    assert results["meta"]["llm_slow"]["redelivered"] == 0  # heartbeats held
    for name, metric in metrics.items():
        assert metric["rolebus"]["median"] is not None, name
        assert metric["baseline"]["median"] is not None, name
        assert metric["ratio"] is not None, name
    assert results["meta"]["server_config"] == "JetStream file store, sync_interval always"
    assert "ratio" in printed
    # Writes are counted: the raw baseline with the guarantee stores one record a task.
    assert metrics["stored writes per task, worker side, no follow-up"]["baseline"]["median"] == 1


def test_bench_can_run_on_another_sync_interval_and_profile_the_worker(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    _, results = run_bench(
        "--only",
        "consume",
        "--sync",
        "2m",
        "--profile",
        str(profile),
        output=tmp_path / "results.json",
    )
    assert results["meta"]["server_config"] == "JetStream file store, sync_interval 2m"
    assert set(results["metrics"]) == {
        "consume vs raw, ack only (what the guarantee costs)",
        "consume vs raw with the same guarantee",
        "stored writes per task, worker side, no follow-up",
        "worker CPU per task at saturation",
        "consume vs FastStream with the same guarantee",
        "consume vs FastStream, ack only (what the guarantee costs)",
    }
    # The profile shows the worker's own frames, where a hot path would be found.
    assert "Shell.handle" in (profile / "consume.txt").read_text()
    assert (profile / "consume.html").read_text().startswith("<!DOCTYPE html>")
