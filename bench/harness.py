"""What every benchmark shares: results with ratios, a raw pull loop, a server."""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from rolebus.nats.server import EmbeddedServer

perf = time.perf_counter


@dataclass
class Metric:
    """One comparison: rolebus against a baseline measured in the same run."""

    name: str
    unit: str
    higher_is_better: bool
    target: float | None = None  # the ratio the issue asks for
    rolebus: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = "raw nats-py"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.rolebus or not self.baseline:
            return None
        base = statistics.median(self.baseline)
        return statistics.median(self.rolebus) / base if base else None

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    def as_json(self) -> dict[str, Any]:
        def spread(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"min": None, "median": None, "max": None}
            return {"min": min(values), "median": statistics.median(values), "max": max(values)}

        return {
            "unit": self.unit,
            "rolebus": spread(self.rolebus),
            "baseline": spread(self.baseline),
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "met": self.met,
            "runs": len(self.rolebus),
            "note": self.note,
        }


class Results:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def metric(
        self,
        name: str,
        unit: str,
        *,
        higher_is_better: bool = True,
        target: float | None = None,
        baseline_name: str = "raw nats-py",
        note: str = "",
    ) -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(
                name, unit, higher_is_better, target, baseline_name=baseline_name, note=note
            )
        return self.metrics[name]

    def table(self) -> str:
        rows = [("metric", "rolebus", "baseline", "ratio", "target", "")]
        for metric in self.metrics.values():

            def show(values: list[float]) -> str:
                return f"{statistics.median(values):,.1f}" if values else "-"

            ratio = metric.ratio
            sign = ">=" if metric.higher_is_better else "<="
            rows.append(
                (
                    f"{metric.name} ({metric.unit})",
                    show(metric.rolebus),
                    f"{show(metric.baseline)} {metric.baseline_name}",
                    f"{ratio:.2f}" if ratio is not None else "-",
                    f"{sign} {metric.target:g}" if metric.target is not None else "",
                    {True: "met", False: "MISSED", None: ""}[metric.met],
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        document = {
            "meta": meta,
            "metrics": {name: m.as_json() for name, m in self.metrics.items()},
        }
        path.write_text(json.dumps(document, indent=2) + "\n")


class RawPuller:
    """The best plain nats-py pull: callback-driven, pipelined (re-pull at half)."""

    def __init__(
        self,
        client: Client,
        stream: str,
        consumer: str,
        batch: int,
        handler: Callable[[Msg], Awaitable[None]],
    ) -> None:
        self.client = client
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self.handler = handler
        self.request = json.dumps({"batch": batch, "expires": int(5e9)}).encode()
        self.outstanding = 0
        self.inbox = client.new_inbox()
        self.subscription: Any = None

    async def start(self) -> None:
        self.subscription = await self.client.subscribe(
            self.inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await self._pull()

    async def _pull(self) -> None:
        await self.client.publish(self.subject, self.request, reply=self.inbox)
        self.outstanding += self.batch

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None:
            if status in ("408", "409"):
                self.outstanding = 0
        else:
            self.outstanding -= 1
            await self.handler(msg)
        if self.outstanding <= self.batch // 2:
            await self._pull()

    async def stop(self) -> None:
        if self.subscription is not None:
            await self.subscription.unsubscribe()


async def connect(url: str) -> Client:
    return await nats.connect(url, allow_reconnect=False)


def start_server(workdir: Path | None = None, *, sync_interval: str = "always") -> EmbeddedServer:
    """The same server config rolebus runs on: JetStream, file store, sync always
    (``sync_interval`` lets a run measure what the fsyncs cost)."""
    folder = Path(tempfile.mkdtemp(prefix="rolebus-bench-", dir=workdir))
    return EmbeddedServer(store_dir=folder, port=0, sync_interval=sync_interval).start()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
