"""Fixtures shared by the integration tests (the real-server ones come from
rolebus.testing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rolebus.config import Settings
from rolebus.team.roles import Team
from rolebus.testing import LlmServer
from rolebus.worker.runner import Crew, start_workers

from .llm_team import ENV, KEY, StartTeam, write_llm_team


@pytest.fixture
async def start_llm_team(
    rolebus_settings: Settings,
    llm_server: LlmServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[StartTeam]:
    monkeypatch.setenv(ENV, KEY)
    crews: list[Crew] = []

    async def start(
        *roles: str,
        timeout: str = "5s",
        prices: str | None = None,
        budget: str = "",
        replicas: int = 1,
        extra: str = "",
        concurrency: int = 4,
        max_repairs: int = 1,
        model: str = "test-model",
        more: str = "",
    ) -> tuple[Team, Crew]:
        extra += f", prices = {prices}" if prices else ""
        team = write_llm_team(
            tmp_path / f"roles{len(crews)}",
            llm_server.url,
            timeout=timeout,
            extra=extra,
            budget=budget,
            concurrency=concurrency,
            max_repairs=max_repairs,
            model=model,
            more=more,
        )
        crew = await start_workers(
            rolebus_settings,
            team,
            [team.role(role) for role in roles or ("eng-be",)],
            grace=1,
            replicas=replicas,
        )
        crews.append(crew)
        return team, crew

    yield start
    for crew in crews:
        await crew.stop(grace=0)
