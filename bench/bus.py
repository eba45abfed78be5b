"""Publish → handle throughput and latency of 1 KB events on this machine.

Three paths, each against the same real NATS (JetStream, file storage) and PostgreSQL:
  raw nats-py   JetStream publish → durable pull consumer, explicit ack (the physical baseline)
  bus direct    ciuic_common.bus: Bus.publish → Bus.subscribe handler
  bus outbox    a transaction writes the event to the outbox → relay → Bus → handler
  pg commit     one 1 KB row per committed transaction, nothing published (the outbox's floor)

Throughput: N events published with a window of concurrent publishes, timed until the last is
handled. Latency: events published one at a time, each timed from publish (or commit) to handler.
Prints a table; never asserts. Run with `make bench` or `python bench/bus.py [--events N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from ciuic_common.bus import Bus, ensure_streams
from ciuic_common.db import Database
from ciuic_common.events import RunFinished
from ciuic_common.logging import configure_logging
from ciuic_common.outbox import Outbox, OutboxRelay
from ciuic_common.servers import NatsServer, PostgresServer, ServerProcess, free_port

PAYLOAD = "x" * 860  # with the envelope, each event is ~1 KB of JSON
WINDOW = 64  # publishes in flight at once in the throughput runs


@dataclass
class Result:
    path: str
    throughput: float
    p50_ms: float
    p99_ms: float


def event(i: int) -> RunFinished:
    return RunFinished(run_id=f"r{i}", outcome="succeeded", reason=PAYLOAD)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


async def windowed(n: int, publish: Callable[[int], Awaitable[None]]) -> None:
    limit = asyncio.Semaphore(WINDOW)

    async def one(i: int) -> None:
        async with limit:
            await publish(i)

    await asyncio.gather(*(one(i) for i in range(n)))


class Arrivals:
    """Counts handled events and wakes waiters."""

    def __init__(self) -> None:
        self.count = 0
        self.stamps: dict[str, float] = {}
        self._changed = asyncio.Event()

    def hit(self, run_id: str) -> None:
        self.count += 1
        self.stamps[run_id] = time.perf_counter()
        self._changed.set()

    async def until(self, count: int, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while self.count < count:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))


async def measure(
    name: str,
    n: int,
    latency_n: int,
    publish: Callable[[int], Awaitable[None]],
    arrivals: Arrivals,
) -> Result:
    start = time.perf_counter()
    await windowed(n, publish)
    await arrivals.until(n)
    throughput = n / (time.perf_counter() - start)

    latencies = []
    for i in range(n, n + latency_n):
        sent = time.perf_counter()
        await publish(i)
        await arrivals.until(i + 1)
        latencies.append((arrivals.stamps[f"r{i}"] - sent) * 1000)
    return Result(name, throughput, percentile(latencies, 50), percentile(latencies, 99))


async def bench_raw(url: str, n: int, latency_n: int) -> Result:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    arrivals = Arrivals()
    sub = await js.pull_subscribe(
        "ciuic.run.finished",
        durable="bench-raw",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )

    async def consume() -> None:
        while True:
            with contextlib.suppress(nats.errors.TimeoutError):
                for msg in await sub.fetch(64, timeout=1):
                    arrivals.hit(RunFinished.model_validate_json(msg.data).run_id)
                    await msg.ack()

    consumer = asyncio.create_task(consume())

    async def publish(i: int) -> None:
        e = event(i)
        await js.publish(e.subject_for(), e.to_bytes(), headers={"Nats-Msg-Id": e.event_id})

    try:
        return await measure("raw nats-py", n, latency_n, publish, arrivals)
    finally:
        consumer.cancel()
        await nc.close()


async def bench_bus(url: str, n: int, latency_n: int) -> Result:
    bus = Bus(url, name="bench-bus")
    arrivals = Arrivals()

    async def handler(e: RunFinished) -> None:
        arrivals.hit(e.run_id)

    bus.subscribe(RunFinished, handler, durable="bench-bus")
    await bus.connect()
    await bus.start()

    async def publish(i: int) -> None:
        await bus.publish(event(i))

    try:
        return await measure("bus direct", n, latency_n, publish, arrivals)
    finally:
        await bus.close()


async def bench_outbox(nats_url: str, db_url: str, n: int, latency_n: int) -> Result:
    bus = Bus(nats_url, name="bench-outbox")
    db = Database(db_url, "bench", max_size=WINDOW + 4)
    arrivals = Arrivals()

    async def handler(e: RunFinished) -> None:
        arrivals.hit(e.run_id)

    bus.subscribe(RunFinished, handler, durable="bench-outbox")
    await bus.connect()
    await db.connect()
    await db.migrate()
    await bus.start()
    outbox = Outbox("bench")
    relay = asyncio.create_task(OutboxRelay(db, bus).run())

    async def publish(i: int) -> None:
        async with db.transaction() as tx:
            await outbox.add(tx, event(i))

    try:
        return await measure("bus outbox", n, latency_n, publish, arrivals)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await db.close()
        await bus.close()


async def bench_commits(db_url: str, n: int, latency_n: int) -> Result:
    """The outbox's floor: one 1 KB row committed per transaction, nothing published."""
    db = Database(db_url, "floor", max_size=WINDOW + 4)
    await db.connect()
    await db.migrate()  # creates the schema
    await db.execute("CREATE TABLE IF NOT EXISTS floor.rows (id text PRIMARY KEY, body bytea)")
    arrivals = Arrivals()

    async def commit(i: int) -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO floor.rows VALUES ($1, $2)", f"r{i}", event(i).to_bytes())
        arrivals.hit(f"r{i}")

    try:
        return await measure("pg commit", n, latency_n, commit, arrivals)
    finally:
        await db.close()


async def run(n: int, latency_n: int) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix="ciuic-bench-"))
    nats_srv = NatsServer(data_dir=root / "nats", port=free_port(), monitor_port=free_port())
    pg_srv = PostgresServer(data_dir=root / "pg", port=free_port())  # durable, as in production
    with ServerProcess(nats_srv, root / "nats.log"), ServerProcess(pg_srv, root / "pg.log"):
        db_url = pg_srv.url.rsplit("/", 1)[0] + "/bench"
        results = [await bench_raw(nats_srv.url, n, latency_n)]
        await _reset(nats_srv.url)
        results.append(await bench_bus(nats_srv.url, n, latency_n))
        await _reset(nats_srv.url)
        results.append(await bench_outbox(nats_srv.url, db_url, n, latency_n))
        results.append(await bench_commits(db_url, n, latency_n))
    return results


async def _reset(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name)
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="events per throughput run")
    parser.add_argument("--latency-events", type=int, default=500)
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    results = asyncio.run(run(args.events, args.latency_events))
    base = results[0]
    print(
        f"\nbus benchmark: {args.events} x 1 KB events, window {WINDOW}; latency over "
        f"{args.latency_events} sequential events\nmachine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print(f"{'path':<14}{'events/s':>12}{'vs raw':>9}{'p50 ms':>10}{'p99 ms':>10}")
    for r in results:
        print(
            f"{r.path:<14}{r.throughput:>12,.0f}{r.throughput / base.throughput:>8.0%} "
            f"{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}"
        )


if __name__ == "__main__":
    main()
