"""Recorded model calls are stored by their parts: what repeats is stored once, an
answer of any size is recorded, and a record whose part is gone is no record."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import nats

from rolebus.bus import Bus
from rolebus.config import Settings
from rolebus.flows.calls import CallStore
from rolebus.nats.server import EmbeddedServer
from rolebus.testing import LlmServer, Reply
from rolebus.wire.subjects import CALLS_BUCKET, PARTS_BUCKET

from ..conftest import CliRunner
from .llm_team import ENV, KEY, StartTeam, WorkerProcess, state_of, until, write_llm_team


async def _values(bus: Bus, bucket: str) -> dict[str, bytes]:
    return {
        change.key: change.value
        async for change in bus.connection.kv.changes(bucket)
        if change.value is not None
    }


async def _stored_since(bus: Bus, before: dict[str, bytes]) -> int:
    """Bytes the calls and parts buckets gained since ``before`` (their values)."""
    now = {**await _values(bus, CALLS_BUCKET), **await _values(bus, PARTS_BUCKET)}
    return sum(len(value) for key, value in now.items() if key not in before)


async def _everything(bus: Bus) -> dict[str, bytes]:
    return {**await _values(bus, CALLS_BUCKET), **await _values(bus, PARTS_BUCKET)}


async def test_a_later_call_stores_what_is_new_in_it_not_the_system_prompt_again(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    await start_llm_team()
    stored: list[int] = []
    raw: list[int] = []
    for number in range(3):
        before = await _everything(rolebus_bus)
        task, _ = await rolebus_bus.publish_task("task.backend.x", title=f"call {number}")
        await until(rolebus_bus, task.id, "completed")
        stored.append(await _stored_since(rolebus_bus, before))
        request = llm_server.requests[-1].body
        [call] = await CallStore(rolebus_bus.connection).for_task(task.id)
        raw.append(len(json.dumps(request["messages"])) + len(call["answer"]))
    # The first call stores the system prompt; the next ones refer to it.
    assert stored[0] > stored[1]
    assert stored[1] / raw[1] <= 0.25, (stored, raw)
    assert stored[2] / raw[2] <= 0.25, (stored, raw)
    system = llm_server.requests[0].system
    parts = await _values(rolebus_bus, PARTS_BUCKET)
    assert [value for value in parts.values() if value == system.encode()] != []
    assert len([value for value in parts.values() if value == system.encode()]) == 1
    # Read back whole: the dashboard and `rolebus show` see the conversation.
    [call] = await CallStore(rolebus_bus.connection).for_task(task.id)
    assert call["messages"][0]["content"] == system


async def test_repair_turns_of_an_attempt_grow_the_store_by_what_each_adds(
    rolebus_bus: Bus, llm_server: LlmServer, start_llm_team: StartTeam
) -> None:
    """Each repair turn stores its own note and answer, never the conversation
    again: the bytes of turn k do not grow with k."""
    wrong = [Reply.plain(f"not json, take {n}: " + "blah " * 300) for n in range(4)]
    llm_server.script(*wrong)
    await start_llm_team(max_repairs=3)
    before = await _everything(rolebus_bus)
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="never valid")
    await until(rolebus_bus, task.id, "retrying", timeout=30)
    calls = await _values(rolebus_bus, CALLS_BUCKET)
    parts = await _values(rolebus_bus, PARTS_BUCKET)
    records = sorted(key for key in calls if key not in before and task.id in key)
    assert len(records) == 4

    def named(key: str) -> set[str]:
        record = json.loads(calls[key])
        texts = [record["answer"], *(m["content"] for m in record["messages"])]
        return {value["$part"] for value in texts if isinstance(value, dict)}

    def part_bytes(digest: str) -> int:
        return sum(len(value) for key, value in parts.items() if digest in key)

    # What the store holds after each turn: the records so far and the parts they name.
    totals, seen = [], set()
    for number, key in enumerate(records):
        seen |= named(key)
        records_bytes = sum(len(calls[k]) for k in records[: number + 1])
        totals.append(records_bytes + sum(part_bytes(digest) for digest in seen))
    added = [after - before for before, after in itertools.pairwise(totals)]
    # Each repair turn adds the same: its record (with its note) and its answer, not
    # the prompt again; the store grows linearly with the turns.
    assert max(added) <= min(added) * 1.1, added
    for number, key in enumerate(records[1:]):
        assert added[number] <= len(calls[key]) + len(wrong[number + 1].text or "")
    system = len(llm_server.requests[0].system)
    sizes = [len(calls[key]) for key in records]
    assert all(size < system / 2 for size in sizes), (sizes, system)  # it is named


async def test_a_ten_megabyte_answer_is_recorded_and_not_paid_again_after_sigkill(
    rolebus_server: EmbeddedServer, llm_server: LlmServer, tmp_path: Path
) -> None:
    """A model that runs away after its outcome (10 MB of blank lines, as a
    grammar-bound model can): far over the server's 1 MiB message limit, recorded in
    chunks; the worker is killed once it is recorded, before the ack, and the
    restarted one finishes from the record."""
    team_dir = tmp_path / "roles"
    write_llm_team(team_dir, llm_server.url, timeout="60s", extra=", stream = false")
    answer = json.dumps({"status": "completed", "result": {"summary": "ok"}})
    answer += "\n" * (10 * 1024 * 1024)
    llm_server.script(Reply.plain(answer))
    workers = WorkerProcess(rolebus_server.url, team_dir, tmp_path / "home")
    async with await Bus.connect(Settings(nats_url=rolebus_server.url)) as bus:
        task, _ = await workers.killed_once_recorded(
            lambda: bus.publish_task("task.backend.x", title="run away")
        )
        assert await state_of(bus, task.id) != "completed"  # killed before the end
        [call] = await CallStore(bus.connection).for_task(task.id)
        assert call["answer"] == answer  # whole, from its chunks
        assert await workers.until(bus, task.id, {"completed"}) == "completed"
    assert llm_server.answered == 1


async def test_a_record_whose_part_expired_makes_rerun_say_it_needs_live(
    rolebus_bus: Bus,
    rolebus_server: EmbeddedServer,
    llm_server: LlmServer,
    start_llm_team: StartTeam,
    tmp_path: Path,
    cli: CliRunner,
) -> None:
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="kept, then expired")
    await until(rolebus_bus, task.id, "completed")
    # What max_age does to a part: gone from the bucket.
    assert await _values(rolebus_bus, PARTS_BUCKET)
    client = await nats.connect(rolebus_server.url)
    try:
        await client.jetstream().purge_stream(f"KV_{PARTS_BUCKET}")
    finally:
        await client.close()
    env = {
        "NATS_URL": rolebus_server.url,
        "ROLEBUS_ROLES": str(tmp_path / "roles0"),
        "ROLEBUS_HOME": str(tmp_path / "home"),
        ENV: KEY,
    }
    rerun = await asyncio.to_thread(cli, "rerun", "--role", "eng-be", "--json", env=env)
    [row] = json.loads(rerun.stdout)["rows"]
    assert row["changed"] is None  # not a difference: an error row
    assert "needs --live" in row["error"]
    assert row["new"] is None
    assert rerun.code == 1
    assert llm_server.answered == 1  # nothing asked without --live


async def test_storage_shows_each_stream_and_bucket_with_its_age_and_growth(
    rolebus_bus: Bus,
    rolebus_server: EmbeddedServer,
    llm_server: LlmServer,
    start_llm_team: StartTeam,
    cli: CliRunner,
) -> None:
    await start_llm_team()
    task, _ = await rolebus_bus.publish_task("task.backend.x", title="something to store")
    await until(rolebus_bus, task.id, "completed")
    env = {"NATS_URL": rolebus_server.url}
    shown = await asyncio.to_thread(cli, "storage", "--json", env=env)
    assert shown.code == 0, shown.stderr
    entries = {entry["name"]: entry for entry in json.loads(shown.stdout)}
    assert {"ROLEBUS_WORK", "ROLEBUS_EVENTS", CALLS_BUCKET, PARTS_BUCKET} <= set(entries)
    calls, parts = entries[CALLS_BUCKET], entries[PARTS_BUCKET]
    assert calls["messages"] >= 1
    assert parts["messages"] >= 1
    assert calls["compression"] == parts["compression"] == "s2"
    assert calls["max_age_s"] == entries["ROLEBUS_EVENTS"]["max_age_s"] == 30 * 86400
    assert parts["max_age_s"] == calls["max_age_s"] * 1.25  # a part outlives its records
    table = await asyncio.to_thread(cli, "storage", env=env)
    assert PARTS_BUCKET in table.stdout
    assert "streams and buckets" in table.stdout
