"""The real-model tier (``make test-model``): a real llama.cpp server, outside ``make test``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .serve import llama_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/model/" in str(item.fspath):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def real_model_url() -> Iterator[str]:
    with llama_server() as url:
        yield url
