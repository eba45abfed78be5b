"""Metrics ingestion and queries on this machine: throughput, point-to-queryable latency, and
curve queries over a million points, each beside its baseline.

Real NATS (JetStream, file storage) and a durable PostgreSQL (fsync on) on free ports, and the
metrics collector as its own process (`python -m ciuic_metrics_collector`), as in production:
  COPY floor       asyncpg copy_records_to_table of point rows, 50,000 per transaction: into a
                   bare table (the physical floor) and into one keyed by (series, step)
  bus → PG         MetricsBatch events of 1,000 points (10 metrics) published straight to the
                   bus, timed until every point is stored (summaries count them)
  SDK → PG         a training process logs with the SDK (`ciuic.log`) into the agent's
                   MetricsChannel, run here with the agent's publisher: SDK → agent → bus → PG
  latency          batches published at a steady rate; each point timed from its publish to its
                   arrival on a StreamMetrics stream (it is queryable once it arrives there)
  query            GetCurves with max_points=1000 over a curve of 1,000,000 points
CPU time of each process is printed per point: on a shared machine, wall-clock throughput
understates what two dedicated cores do. Prints a table; never asserts. `make bench` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from ciuic_common.bus import Bus
from ciuic_common.events import MetricColumns, MetricsBatch
from ciuic_common.logging import configure_logging
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.rpc import channel
from ciuic_common.servers import NatsServer, PostgresServer, ServerProcess, free_port
from ciuic_gpu_agent.channel import MetricsChannel

KEYS = [f"metric_{i}" for i in range(10)]
WINDOW = 64  # publishes in flight at once
MLFLOW = 8_400  # points/s, mlflow-go-backend benchmark of MLflow's Python tracking server
WANDB = 100_000 / 60  # values/s, W&B's documented limit of 100,000 values a minute


@dataclass
class Row:
    figure: str
    value: str
    target: str
    baseline: str


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


class Cpu:
    """CPU seconds used by each kind of process (collector, postgres, nats, this bench)."""

    def __init__(self, collector: int) -> None:
        self.collector = collector
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / self.tick
            if int(pid) == self.collector:
                kind = "collector"
            elif int(pid) == os.getpid():
                kind = "bench"
            elif name.startswith("postgres"):
                kind = "postgres"
            elif name.startswith("nats"):
                kind = "nats"
            else:
                continue
            out[kind] = out.get(kind, 0.0) + seconds
        return out

    @staticmethod
    def per_point(before: dict[str, float], after: dict[str, float], points: int) -> str:
        used = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / points * 1e6 for k in after}
        total = sum(used.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(used.items()))
        return f"{total:.1f} CPU-µs/point ({parts})"


# --- COPY floor ----------------------------------------------------------------------------------


async def copy_floor(db_url: str, rows: int) -> tuple[float, float]:
    conn = await asyncpg.connect(db_url)
    now = datetime.now(UTC)
    records = [(i % 10, i // 10, i * 0.5, now) for i in range(rows)]
    rates = []
    try:
        for key in ("", ", PRIMARY KEY (series, step)"):
            await conn.execute("DROP TABLE IF EXISTS copy_floor")
            await conn.execute(
                "CREATE TABLE copy_floor (series integer NOT NULL, step bigint NOT NULL,"
                f" value float8 NOT NULL, time timestamptz NOT NULL{key})"
            )
            started = time.perf_counter()
            for i in range(0, rows, 50_000):
                async with conn.transaction():
                    await conn.copy_records_to_table("copy_floor", records=records[i : i + 50_000])
            rates.append(rows / (time.perf_counter() - started))
        await conn.execute("DROP TABLE copy_floor")
    finally:
        await conn.close()
    return rates[0], rates[1]


# --- the collector -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def collector(nats_url: str, db_url: str, root: Path) -> AsyncIterator[tuple[int, int]]:
    """The collector as a process; yields (pid, gRPC port) once it serves."""
    port = free_port()
    env = dict(
        os.environ,
        CIUIC_NATS_URL=nats_url,
        CIUIC_DATABASE_URL=db_url,
        CIUIC_GRPC_PORT=str(port),
        CIUIC_METRICS_PORT="0",
        CIUIC_DASHBOARD_PORT="0",
        CIUIC_LOG_LEVEL="WARNING",
    )
    with (root / "collector.log").open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ciuic_metrics_collector", env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the collector did not start; see {root / 'collector.log'}")
            await asyncio.sleep(0.2)
        yield proc.pid, port
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)


class Stored:
    """How many points the collector has stored, read from its series summaries."""

    def __init__(self, conn: asyncpg.Connection) -> None:  # type: ignore[type-arg]
        self.conn = conn

    async def count(self, run_id: str) -> int:
        value = await self.conn.fetchval(
            "SELECT coalesce(sum(s.count), 0) FROM metrics_collector.series s"
            " JOIN metrics_collector.runs r ON r.id = s.run WHERE r.run_id = $1",
            run_id,
        )
        return int(value)

    async def until(self, run_id: str, points: int, limit: float = 600) -> None:
        deadline = time.monotonic() + limit
        while await self.count(run_id) < points:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run_id}: not every point was stored in {limit:g}s")
            await asyncio.sleep(0.02)


def columns(steps: range, keys: list[str], value: Callable[[int], float]) -> MetricColumns:
    """Every key at every step (step-major, as a training loop logs), all at one time."""
    now = time.time()
    n = len(keys)
    return MetricColumns(
        keys=keys * len(steps),
        steps=[s for s in steps for _ in range(n)],
        values=[value(s) for s in steps for _ in range(n)],
        times=[now] * (n * len(steps)),
    )


def batches(run_id: str, points: int, per_batch: int = 1000) -> list[MetricsBatch]:
    steps = per_batch // len(KEYS)
    return [
        MetricsBatch.from_columns(
            columns(range(b * steps, (b + 1) * steps), KEYS, lambda s: s * 1e-3),
            run_id=run_id,
            job_id=f"{run_id}-trial-0",
        )
        for b in range(points // per_batch)
    ]


async def windowed(
    items: list[MetricsBatch], publish: Callable[[MetricsBatch], Awaitable[object]]
) -> None:
    limit = asyncio.Semaphore(WINDOW)

    async def one(item: MetricsBatch) -> None:
        async with limit:
            await publish(item)

    await asyncio.gather(*(one(i) for i in items))


async def bus_throughput(bus: Bus, stored: Stored, cpu: Cpu, points: int) -> tuple[float, str]:
    events = batches("bench-bus", points)  # built before the clock starts: agents build them
    before = cpu.sample()
    started = time.perf_counter()
    await windowed(events, bus.publish)
    await stored.until("bench-bus", points)
    rate = points / (time.perf_counter() - started)
    return rate, Cpu.per_point(before, cpu.sample(), points)


SDK_SCRIPT = textwrap.dedent(
    """
    import sys, ciuic
    steps, keys = int(sys.argv[1]), sys.argv[2:]
    for step in range(steps):
        ciuic.log({k: step * 1e-3 for k in keys}, step=step)
    ciuic.close()
    """
)


async def sdk_throughput(
    bus: Bus, stored: Stored, cpu: Cpu, points: int, root: Path
) -> tuple[float, str]:
    """A training process → the SDK → the agent's MetricsChannel → the bus → the collector."""
    run_id, job_id = "bench-sdk", "bench-sdk-trial-0"

    async def publish(batch: MetricColumns) -> None:  # what the agent's runner does
        await bus.publish(MetricsBatch.from_columns(batch, run_id=run_id, job_id=job_id))

    socket = root / "metrics.sock"
    async with MetricsChannel(socket, publish) as ch:
        before = cpu.sample()
        started = time.perf_counter()
        trainer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SDK_SCRIPT, str(points // len(KEYS)), *KEYS,
            env=dict(os.environ, CIUIC_METRICS_SOCKET=str(ch.path)),
        )  # fmt: skip
        await trainer.wait()
        await stored.until(run_id, points)
        rate = points / (time.perf_counter() - started)
        after = cpu.sample()
    return rate, Cpu.per_point(before, after, points)


async def latency(
    bus: Bus, stub: metrics_collector_pb2_grpc.MetricsServiceStub, rate: int, seconds: float
) -> tuple[float, float]:
    """Batches of 1,000 points at `rate` points/s; each point from publish to its stream."""
    run_id, per_batch = "bench-latency", 1000
    await bus.publish(batches(run_id, per_batch)[0])  # the run exists before the stream starts
    await asyncio.sleep(1)
    stream = stub.StreamMetrics(
        pb.StreamMetricsRequest(run_id=run_id, keys=[KEYS[0]], after_step=10**9)
    )
    sent: dict[int, float] = {}
    seen: list[float] = []
    total = int(rate * seconds) // per_batch

    async def receive() -> None:
        async for update in stream:
            now = time.perf_counter()
            for s in update.series:
                seen.extend(now - sent[p.step // 100] for p in s.points)
            if len(seen) >= total * 100:
                return

    receiver = asyncio.create_task(receive())
    await asyncio.sleep(0.5)
    interval = per_batch / rate
    start = time.perf_counter()
    for i in range(total):
        first = 10**9 + (i + 1) * 100  # aligned: step // 100 names the batch
        batch = MetricsBatch.from_columns(
            columns(range(first, first + 100), KEYS, lambda s: 1.0),
            run_id=run_id,
            job_id=f"{run_id}-trial-0",
        )
        sent[first // 100] = time.perf_counter()
        await bus.publish(batch)
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))
    await asyncio.wait_for(receiver, 60)
    stream.cancel()
    ms = [x * 1000 for x in seen]
    return percentile(ms, 50), percentile(ms, 99)


async def query(
    bus: Bus, stored: Stored, stub: metrics_collector_pb2_grpc.MetricsServiceStub, calls: int
) -> tuple[float, float, int]:
    run_id, per_batch, n = "bench-curve", 5000, 1_000_000
    events = [
        MetricsBatch.from_columns(
            columns(range(b, b + per_batch), ["loss"], lambda s: 1 / (1 + s)),
            run_id=run_id,
            job_id=f"{run_id}-trial-0",
        )
        for b in range(0, n, per_batch)
    ]
    await windowed(events, bus.publish)
    await stored.until(run_id, n)
    request = pb.GetCurvesRequest(run_id=run_id, keys=["loss"], max_points=1000)
    drawn = 0
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        response = await stub.GetCurves(request)
        times.append((time.perf_counter() - started) * 1000)
        drawn = len(response.series[0].points)
    return percentile(times, 50), percentile(times, 95), drawn


async def run(args: argparse.Namespace) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="ciuic-bench-metrics-"))
    nats_srv = NatsServer(data_dir=root / "nats", port=free_port(), monitor_port=free_port())
    pg_srv = PostgresServer(data_dir=root / "pg", port=free_port())  # durable, as in production
    rows: list[Row] = []
    with ServerProcess(nats_srv, root / "nats.log"), ServerProcess(pg_srv, root / "pg.log"):
        db_url = pg_srv.url.rsplit("/", 1)[0] + "/postgres"
        bare, keyed = await copy_floor(db_url, args.points)
        rows.append(Row("COPY floor, bare table", f"{bare:,.0f} rows/s", "", "the physical limit"))
        rows.append(
            Row(
                "COPY, keyed (series, step)",
                f"{keyed:,.0f} rows/s",
                "",
                f"{keyed / bare:.0%} of bare",
            )
        )
        db_url = pg_srv.url.rsplit("/", 1)[0] + "/ciuic"
        async with collector(nats_srv.url, db_url, root) as (pid, port):
            bus = Bus(nats_srv.url, name="bench-metrics")
            await bus.connect()
            conn = await asyncpg.connect(db_url)
            cpu = Cpu(pid)
            try:
                stored = Stored(conn)
                rate, cost = await bus_throughput(bus, stored, cpu, args.points)
                rows.append(Row(
                    "ingest bus → PG", f"{rate:,.0f} points/s", "≥ 200,000",
                    f"{rate / keyed:.0%} of keyed COPY; {rate / MLFLOW:.0f}x MLflow; {cost}",
                ))  # fmt: skip
                rate, cost = await sdk_throughput(bus, stored, cpu, args.sdk_points, root)
                rows.append(Row(
                    "ingest SDK → agent → bus → PG", f"{rate:,.0f} points/s", "≥ 200,000",
                    f"{rate / MLFLOW:.0f}x MLflow, {rate / WANDB:,.0f}x W&B's limit; {cost}",
                ))  # fmt: skip
                async with channel(f"127.0.0.1:{port}", timeout=None) as ch:
                    stub = metrics_collector_pb2_grpc.MetricsServiceStub(ch)
                    p50, p99 = await latency(bus, stub, args.latency_rate, args.latency_seconds)
                    rows.append(Row(
                        f"point → queryable at {args.latency_rate:,} points/s",
                        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms", "p99 < 1,000 ms",
                        "publish → stored → pushed on StreamMetrics",
                    ))  # fmt: skip
                    q50, q95, drawn = await query(bus, stored, stub, args.queries)
                    rows.append(Row(
                        "GetCurves 1,000 of 1,000,000 points",
                        f"p50 {q50:.1f} ms, p95 {q95:.1f} ms",
                        "< 100 ms", f"{drawn} points drawn from rollups",
                    ))  # fmt: skip
            finally:
                await conn.close()
                await bus.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="points per bus run")
    parser.add_argument("--sdk-points", type=int, default=500_000, help="points through the SDK")
    parser.add_argument("--latency-rate", type=int, default=100_000, help="points/s offered")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    rows = asyncio.run(run(args))
    load = os.getloadavg()[0]
    print(
        f"\nmetrics benchmark: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {load:.1f} at the end\n"
    )
    width = max(len(r.figure) for r in rows) + 2
    print(f"{'figure':<{width}}{'measured':<30}{'target':<16}baseline / notes")
    for r in rows:
        print(f"{r.figure:<{width}}{r.value:<30}{r.target:<16}{r.baseline}")


if __name__ == "__main__":
    main()
