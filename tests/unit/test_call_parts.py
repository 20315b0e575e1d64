"""How recorded calls are stored by parts, with an in-memory bucket pair: what is
written, when a part is written again, and what a damaged part reads as."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import pytest

from rolebus.flows.calls import CHUNK, CallStore
from rolebus.wire.subjects import CALLS_BUCKET, PARTS_BUCKET


class _Kv:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], bytes] = {}
        self.puts: list[tuple[str, str]] = []

    async def put(self, bucket: str, key: str, value: bytes) -> int:
        self.values[(bucket, key)] = value
        self.puts.append((bucket, key))
        return len(self.puts)

    async def get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        found = self.values.get((bucket, key))
        return None if found is None else (found, 1)


class _Connection:
    def __init__(self) -> None:
        self.kv = _Kv()


SYSTEM = "You are the backend engineer. " * 40  # over PART_MIN: a part


def record(answer: str = "ok") -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": SYSTEM}], "answer": answer}


async def test_a_part_is_written_once_then_again_after_a_quarter_of_the_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr("rolebus.flows.calls.time", clock)  # that module's clock only
    connection = _Connection()
    store = CallStore(connection, role="eng-be", max_age=400.0)  # type: ignore[arg-type]
    digest = hashlib.sha256(SYSTEM.encode()).hexdigest()
    part = (PARTS_BUCKET, f"eng-be.{digest}")

    await store.put("t1.g0.c1", record())
    await store.put("t2.g0.c1", record())
    assert connection.kv.puts.count(part) == 1  # the second call names it only
    now[0] += 101.0  # past a quarter of the age: written again, so it outlives records
    await store.put("t3.g0.c1", record())
    assert connection.kv.puts.count(part) == 2
    assert (await store.get("t3.g0.c1")) == record()


async def test_a_large_answer_is_chunked_and_a_damaged_part_is_no_record() -> None:
    connection = _Connection()
    store = CallStore(connection, role="eng-be")  # type: ignore[arg-type]
    answer = "x" * (2 * CHUNK + 10)
    await store.put("t1.g0.c1", record(answer))
    chunks = [key for bucket, key in connection.kv.values if bucket == PARTS_BUCKET]
    assert len([key for key in chunks if key.count(".") == 2]) == 3  # 3 numbered chunks
    assert len(connection.kv.values[(CALLS_BUCKET, "eng-be.t1.g0.c1")]) < 1000
    assert (await store.get("t1.g0.c1")) == record(answer)
    first = next(key for key in chunks if key.endswith(".0"))
    connection.kv.values[(PARTS_BUCKET, first)] = b"y" * CHUNK  # not what its hash says
    assert await store.get("t1.g0.c1") is None  # asked again, never answered wrongly
