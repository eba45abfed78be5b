"""The agent's end of the metrics channel, over real Unix sockets (and the real SDK)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciuic_common.events import MetricColumns, MetricPoint, MetricsBatch
from ciuic_gpu_agent.channel import MetricsChannel, parse_line


def line(key: str, step: int, value: float, ts: float = 1_764_000_000.5) -> bytes:
    """A line exactly as the SDK writes it."""
    return json.dumps({"key": key, "step": step, "value": value, "ts": ts}).encode()


class Collected:
    """The batches a channel handed over, in order."""

    def __init__(self) -> None:
        self.batches: list[MetricColumns] = []
        self.arrived = asyncio.Event()

    async def __call__(self, points: MetricColumns) -> None:
        self.batches.append(points)
        self.arrived.set()

    @property
    def events(self) -> list[MetricsBatch]:
        """The batches as the agent's runner publishes them."""
        return [MetricsBatch.from_columns(b, run_id="r", job_id="j") for b in self.batches]

    @property
    def points(self) -> list[MetricPoint]:
        return [p for event in self.events for p in event.points]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a Unix socket path must stay under 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="ciuic-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def channel(socket_dir: Path) -> AsyncIterator[tuple[MetricsChannel, Collected]]:
    collected = Collected()
    async with MetricsChannel(socket_dir / "m.sock", collected) as channel:
        yield channel, collected


async def write(path: Path, *chunks: bytes, pause: float = 0.0) -> None:
    """Connect as a job would, write `chunks` (pausing between them), close."""
    _, writer = await asyncio.open_unix_connection(str(path))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    writer.close()
    await writer.wait_closed()


async def test_points_the_sdk_logs_arrive_as_metric_points_with_nan_and_inf_kept(
    socket_dir: Path,
) -> None:
    collected = Collected()
    script = (
        "import ciuic\n"
        "ciuic.log({'loss': 2.5, 'acc': 0.5}, step=3)\n"
        "ciuic.log({'loss': float('nan')})\n"
        "ciuic.log({'loss': float('inf'), 'acc': float('-inf')}, step=7)\n"
    )
    async with MetricsChannel(socket_dir / "m.sock", collected) as channel:
        env = {**os.environ, "CIUIC_METRICS_SOCKET": str(channel.path)}
        job = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env)
        assert await asyncio.wait_for(job.wait(), 30) == 0
    got = [(p.key, p.step, p.value) for p in collected.points]
    assert got[:2] == [("loss", 3, 2.5), ("acc", 3, 0.5)]
    assert got[2][:2] == ("loss", 4)
    assert math.isnan(got[2][2])
    assert got[3:] == [("loss", 7, math.inf), ("acc", 7, -math.inf)]
    assert all(p.timestamp.tzinfo is not None for p in collected.points)
    assert channel.stats.garbage == 0
    # They travel on the bus as they are.
    (batch,) = collected.events
    again = MetricsBatch.from_bytes(batch.to_bytes())
    assert again.keys == batch.keys
    assert again.steps == batch.steps
    assert again.times == batch.times
    assert math.isnan(again.values[2])
    assert again.values[3] == math.inf


async def test_a_line_split_across_writes_is_put_back_together(
    channel: tuple[MetricsChannel, Collected],
) -> None:
    ch, collected = channel
    whole = line("loss", 1, 0.25) + b"\n"
    await write(ch.path, whole[:10], whole[10:30], whole[30:], pause=0.02)
    await ch.close()
    assert [(p.key, p.step, p.value) for p in collected.points] == [("loss", 1, 0.25)]


async def test_an_oversized_line_is_counted_once_and_the_next_point_is_kept(
    socket_dir: Path,
) -> None:
    collected = Collected()
    async with MetricsChannel(socket_dir / "m.sock", collected, max_line_bytes=1000) as ch:
        huge = b'{"key": "' + b"x" * 5000
        await write(ch.path, huge[:2500], huge[2500:] + b'"}\n' + line("ok", 0, 1.0) + b"\n")
    assert ch.stats.garbage_by_reason == {"oversized": 1}
    assert [p.key for p in collected.points] == ["ok"]


wrong_values = st.sampled_from(
    [
        ("key", ""),
        ("key", 3),
        ("step", -1),
        ("step", 1.5),
        ("step", "3"),
        ("step", True),
        ("step", 2**64),
        ("value", "0.5"),
        ("value", True),
        ("value", None),
        ("value", [1.0]),
        ("ts", "yesterday"),
    ]
)


@st.composite
def garbage_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "wrong", "missing", "not_object"]))
    if kind == "bytes":
        raw = draw(st.binary(min_size=1, max_size=60)).replace(b"\n", b"")
    elif kind == "text":
        raw = draw(st.text(min_size=1, max_size=60)).replace("\n", "").encode()
    elif kind == "wrong":
        field, value = draw(wrong_values)
        raw = json.dumps({"key": "loss", "step": 1, "value": 1.0, field: value}).encode()
    elif kind == "missing":
        point = {"key": "loss", "step": 1, "value": 1.0}
        del point[draw(st.sampled_from(list(point)))]
        raw = json.dumps(point).encode()
    else:
        raw = json.dumps(draw(st.sampled_from([[], 3, "loss", None, [{"key": "x"}]]))).encode()
    return raw if raw.strip() else b"?"


good_lines = st.builds(
    line,
    st.text(min_size=1, max_size=12).filter(lambda k: "\n" not in k),
    st.integers(0, 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.booleans(), good_lines, garbage_lines()), max_size=40),
    st.integers(1, 97),
)
def test_garbage_is_counted_and_never_costs_another_point(
    mixed: list[tuple[bool, bytes, bytes]], chunk: int
) -> None:
    lines = [good if is_good else bad for is_good, good, bad in mixed]
    expected = [json.loads(good) for is_good, good, _ in mixed if is_good]
    stream = b"".join(x + b"\n" for x in lines)

    async def scenario() -> tuple[list[MetricPoint], int, int]:
        collected = Collected()
        with tempfile.TemporaryDirectory(prefix="ciuic-") as tmp:
            async with MetricsChannel(Path(tmp) / "m.sock", collected) as ch:
                pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
                await write(ch.path, *pieces)
        return collected.points, ch.stats.garbage, ch.stats.points

    points, garbage, counted = asyncio.run(scenario())
    assert [(p.key, p.step) for p in points] == [(e["key"], e["step"]) for e in expected]
    for p, e in zip(points, expected, strict=True):
        assert p.value == e["value"] or (math.isnan(p.value) and math.isnan(e["value"]))
    assert garbage == sum(1 for is_good, _, _ in mixed if not is_good)
    assert counted == len(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"key": "loss", "step": 1, "value": 1.0', "bad_json"),
        (b'{"key": "loss", "value": 1.0, "ts": 1.0}', "missing_field"),
        (b'{"key": "loss", "step": "1", "value": 1.0, "ts": 1.0}', "wrong_type"),
        (b'{"key": "loss", "step": 1, "value": true, "ts": 1.0}', "wrong_type"),
        (b'{"key": "loss", "step": -1, "value": 1.0, "ts": 1.0}', "bad_value"),
        (b"[1, 2]", "not_an_object"),
    ],
)
def test_each_kind_of_garbage_is_named(text: bytes, reason: str) -> None:
    assert parse_line(text) == reason


async def test_a_point_without_a_timestamp_gets_its_arrival_time(
    channel: tuple[MetricsChannel, Collected],
) -> None:
    point = parse_line(b'{"key": "loss", "step": 2, "value": NaN}')
    assert isinstance(point, dict)
    assert math.isnan(point["value"])
    ch, collected = channel
    before = time.time()
    await write(ch.path, b'{"key": "loss", "step": 2, "value": NaN}\n')
    await ch.close()
    (at,) = collected.batches[0].times
    assert before <= at <= time.time()


async def test_garbage_is_reported_in_stats_with_samples(
    channel: tuple[MetricsChannel, Collected],
) -> None:
    ch, collected = channel
    await write(ch.path, b"not json\n" + line("loss", 0, 1.0) + b"\n{}\n")
    await ch.close()
    assert ch.stats.garbage == 2
    assert ch.stats.garbage_by_reason == {"bad_json": 1, "missing_field": 1}
    assert ch.stats.garbage_samples[0] == "bad_json: not json"
    assert len(collected.points) == 1


async def test_a_few_points_are_flushed_by_the_interval_without_waiting_for_more(
    channel: tuple[MetricsChannel, Collected],
) -> None:
    ch, collected = channel
    await write(ch.path, b"".join(line("loss", s, 1.0) + b"\n" for s in range(5)))
    await asyncio.wait_for(collected.arrived.wait(), 5)  # the channel is still open
    assert [p.step for p in collected.points] == [0, 1, 2, 3, 4]


async def test_batches_never_exceed_the_batch_size_and_keep_the_order(socket_dir: Path) -> None:
    collected = Collected()
    async with MetricsChannel(socket_dir / "m.sock", collected, max_batch=300) as ch:
        await write(ch.path, b"".join(line("loss", s, 1.0) + b"\n" for s in range(1000)))
    assert max(len(b) for b in collected.batches) <= 300
    assert [p.step for p in collected.points] == list(range(1000))


async def test_every_process_of_a_job_may_write_at_once(socket_dir: Path) -> None:
    collected = Collected()
    async with MetricsChannel(socket_dir / "m.sock", collected) as ch:
        await asyncio.gather(
            *(
                write(ch.path, b"".join(line(f"rank{r}", s, 1.0) + b"\n" for s in range(200)))
                for r in range(4)
            )
        )
    assert ch.stats.connections == 4
    for r in range(4):
        assert [p.step for p in collected.points if p.key == f"rank{r}"] == list(range(200))


async def test_a_slow_consumer_pauses_the_writer_instead_of_dropping_points(
    socket_dir: Path,
) -> None:
    received: list[int] = []

    async def slow(points: MetricColumns) -> None:
        await asyncio.sleep(0.001)
        received.extend(points.steps)

    channel = MetricsChannel(socket_dir / "m.sock", slow, max_batch=50, max_pending=200)
    async with channel:
        await write(channel.path, b"".join(line("loss", s, 1.0) + b"\n" for s in range(20_000)))
    assert received == list(range(20_000))
    assert channel.stats.pauses >= 1


async def test_a_failing_callback_costs_its_batch_only_and_says_so(socket_dir: Path) -> None:
    delivered: list[int] = []

    async def flaky(points: MetricColumns) -> None:
        if points.steps[0] == 0:
            raise ConnectionError("bus down")
        delivered.extend(points.steps)

    async with MetricsChannel(socket_dir / "m.sock", flaky, max_batch=10) as ch:
        await write(ch.path, b"".join(line("loss", s, 1.0) + b"\n" for s in range(30)))
    assert delivered == list(range(10, 30))
    assert ch.stats.dropped == 10


async def test_the_channel_keeps_a_summary_of_every_metric(
    channel: tuple[MetricsChannel, Collected],
) -> None:
    ch, _ = channel
    await write(ch.path, b"".join(line("loss", s, float(10 - s)) + b"\n" for s in range(10)))
    await ch.close()
    summary = ch.summaries.as_dict()["loss"]
    assert (summary["min"], summary["max"], summary["last"], summary["count"]) == (
        1.0,
        10.0,
        1.0,
        10.0,
    )


async def test_a_stale_socket_file_is_replaced_and_removed_at_close(socket_dir: Path) -> None:
    first = MetricsChannel(socket_dir / "m.sock", Collected())
    await first.start()
    first._server.close()  # type: ignore[union-attr]  # an agent that died: file left behind
    second = MetricsChannel(socket_dir / "m.sock", Collected())
    async with second:
        await write(second.path, line("loss", 0, 1.0) + b"\n")
    assert not second.path.exists()
    await first._batcher.close()


def test_a_socket_path_too_long_for_unix_sockets_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the 107"):
        MetricsChannel("/tmp/" + "d" * 120 + "/m.sock", Collected())
