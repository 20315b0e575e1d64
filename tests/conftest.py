"""Shared test helpers. The real-server fixtures come from rolebus.testing (a pytest
plugin installed with the package)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from rolebus.cli.main import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


CliRunner = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """Run the rolebus command in this process; returns exit code and output."""

    def invoke(*argv: str, env: dict[str, str] | None = None) -> CliResult:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
        finally:
            # The CLI configured logging to pytest's captured stderr, which closes
            # after the test: later tests must not log into it.
            structlog.reset_defaults()
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def user_environment(home: Path, **extra: str) -> dict[str, str]:
    """What a user's shell gives the installed `rolebus` command: no NATS_URL (the
    embedded server is used), a private state folder, any free port, our roles."""
    env = {
        **os.environ,
        "ROLEBUS_HOME": str(home),
        "ROLEBUS_PORT": "0",
        "ROLEBUS_ROLES": str(REPO / "roles"),
        **extra,
    }
    env.pop("NATS_URL", None)
    return env


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's NATS_URL or state folder."""
    for name in ("NATS_URL", "NATS_CREDS", "NATS_USER", "NATS_PASSWORD", "NATS_NKEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROLEBUS_HOME", str(tmp_path / "rolebus-home"))
    monkeypatch.setenv("ROLEBUS_ROLES", str(REPO / "roles"))


class FaultLog:
    """What the fault suite injected in this run, for the summary table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, int, int]] = []

    def record(self, fault: str, injected: int, report: Any) -> None:
        duplicates = len(report.duplicate_completed) + len(report.duplicate_messages)
        self.rows.append((fault, injected, report.published, len(report.lost), duplicates))


_FAULTS = FaultLog()


@pytest.fixture
def fault_log() -> FaultLog:
    return _FAULTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FAULTS.rows:
        return
    terminalreporter.write_sep("-", "faults injected")
    terminalreporter.write_line(
        "| fault | injected | tasks published | lost | duplicated effects |"
    )
    terminalreporter.write_line("| --- | --- | --- | --- | --- |")
    for fault, injected, published, lost, duplicates in _FAULTS.rows:
        terminalreporter.write_line(
            f"| {fault} | {injected} | {published} | {lost} | {duplicates} |"
        )
