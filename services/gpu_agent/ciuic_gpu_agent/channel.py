"""The agent's end of a job's metrics channel: the Unix socket the SDK writes to.

The SDK (`libs/sdk/ciuic/_channel.py`) connects to the path in `CIUIC_METRICS_SOCKET` and writes
one JSON object per line: `{"key": str, "step": int, "value": float, "ts": unix seconds}`, with
NaN and infinities as JSON's `NaN`/`Infinity`/`-Infinity` extensions. Any process of the job may
connect, as often as it likes (every DDP rank, a reconnect after an error).

`MetricsChannel` serves that socket for one job: it parses every line straight into the columns
of a `MetricColumns` (NaN/±inf kept; no object per point, as `MetricsBatch` carries columns),
counts what is not a point (bad JSON, missing fields, wrong types, values out of range,
oversized lines) in `stats` without dropping the points around it, keeps per-metric `summaries`
for `JobFinished.metrics`, and hands the columns to an async callback in batches: at least
every `flush_interval` (100 ms) and as soon as `max_batch` points are waiting. When the callback
falls behind by `max_pending` points the channel stops reading the socket (the writer then blocks
in the SDK) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Annotated, NotRequired, Self

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from ciuic_common.events import MAX_UNIX_TIME, MetricColumns
from ciuic_common.logging import get_logger
from ciuic_gpu_agent.summary import DEFAULT_LAST_K, Summaries

__all__ = [
    "ChannelStats",
    "MetricsChannel",
    "PointBatcher",
    "WirePoint",
    "parse_line",
]

log = get_logger(__name__)

OnBatch = Callable[[MetricColumns], Awaitable[None]]

#: Lines longer than this are garbage (the SDK's lines are ~100 bytes).
DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_BATCH = 1000
DEFAULT_FLUSH_INTERVAL = 0.1
DEFAULT_MAX_PENDING = 200_000
#: The longest path a Unix socket accepts on Linux (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH_BYTES = 107
_MAX_STEP = 2**63 - 1  # steps are stored as bigint downstream


class WirePoint(TypedDict):
    """A line as the SDK writes it, with strict types (validated by pydantic-core straight from
    the JSON bytes, into a dict: faster than a model, and json.loads plus checks by hand)."""

    key: Annotated[str, Field(strict=True, min_length=1)]
    step: Annotated[int, Field(strict=True, ge=0, le=_MAX_STEP)]
    value: Annotated[float, Field(strict=True)]  # int or float; never bool or a string
    #: Unix seconds; a writer that sends none gets the arrival time.
    ts: NotRequired[Annotated[float, Field(strict=True, ge=0, le=MAX_UNIX_TIME)]]


_validate_line = TypeAdapter(WirePoint).validate_json

#: pydantic error types -> the garbage reason we count.
_REASONS = {
    "json_invalid": "bad_json",
    "json_type": "bad_json",
    "missing": "missing_field",
    "model_type": "not_an_object",
    "model_attributes_type": "not_an_object",
    "dict_type": "not_an_object",
}


def _reason(error: ValidationError) -> str:
    kind = error.errors(include_url=False, include_context=False, include_input=False)[0]["type"]
    if kind in _REASONS:
        return _REASONS[kind]
    return "wrong_type" if kind.endswith("_type") else "bad_value"


def parse_line(line: bytes) -> WirePoint | str:
    """One line of the channel (without its newline) as a point, or the reason it is garbage."""
    try:
        return _validate_line(line)
    except ValidationError as error:
        return _reason(error)


@dataclass
class ChannelStats:
    """What a channel has seen: points, garbage by reason, connections, batches."""

    points: int = 0
    garbage: int = 0
    garbage_by_reason: dict[str, int] = field(default_factory=dict)
    #: The last few garbage lines (truncated), for a person reading the agent's log.
    garbage_samples: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    connections: int = 0
    batches: int = 0
    #: Times the channel stopped reading because the callback fell `max_pending` points behind.
    pauses: int = 0
    #: Points the batch callback raised on (it owns retries; these are gone).
    dropped: int = 0

    def count_garbage(self, reason: str, line: bytes) -> None:
        self.garbage += 1
        self.garbage_by_reason[reason] = self.garbage_by_reason.get(reason, 0) + 1
        sample = line[:200].decode("utf-8", errors="replace")
        self.garbage_samples.append(f"{reason}: {sample}{'...' if len(line) > 200 else ''}")


class PointBatcher:
    """Collects points (as columns) and hands them to an async callback in order, in batches of
    at most `max_batch`, at the latest `interval` seconds after the oldest waiting point arrived."""

    def __init__(
        self,
        on_batch: OnBatch,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        stats: ChannelStats | None = None,
    ) -> None:
        if max_batch < 1 or interval <= 0:
            raise ValueError("max_batch must be at least 1 and interval positive")
        self._on_batch = on_batch
        self.max_batch = max_batch
        self.interval = interval
        self.stats = stats or ChannelStats()
        self._points = MetricColumns()
        self._oldest_at = 0.0  # loop time the oldest waiting point arrived
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        #: Called with the number of waiting points after each batch (the channel's backpressure).
        self.on_drained: Callable[[int], None] | None = None

    @property
    def pending(self) -> int:
        """Points waiting for the callback."""
        return len(self._points)

    def start(self) -> None:
        """Start flushing in a task of the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="point-batcher")

    def extend(self, points: MetricColumns) -> None:
        """Queue points (from the event loop's thread)."""
        if not points:
            return
        waiting = self._points
        if not waiting:
            self._oldest_at = asyncio.get_running_loop().time()
            self._wakeup.set()
        waiting.keys.extend(points.keys)
        waiting.steps.extend(points.steps)
        waiting.values.extend(points.values)
        waiting.times.extend(points.times)
        if len(waiting) >= self.max_batch:
            self._wakeup.set()

    async def close(self) -> None:
        """Hand every waiting point to the callback, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        else:
            await self._drain_all()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._points:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            due = self._oldest_at + self.interval - loop.time()
            if len(self._points) < self.max_batch and due > 0 and not self._closing:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), due)
                continue
            await self._flush_one()

    async def _drain_all(self) -> None:
        while self._points:
            await self._flush_one()

    async def _flush_one(self) -> None:
        waiting, n = self._points, self.max_batch
        if len(waiting) <= n:
            batch, self._points = waiting, MetricColumns()
        else:
            batch = MetricColumns(
                waiting.keys[:n], waiting.steps[:n], waiting.values[:n], waiting.times[:n]
            )
            for column in (waiting.keys, waiting.steps, waiting.values, waiting.times):
                del column[:n]
        # What is left arrived no earlier than the oldest point of this batch: keeping the old
        # deadline flushes it a little early, never late.
        try:
            await self._on_batch(batch)
            self.stats.batches += 1
        except Exception as error:  # the callback owns retries; say what was lost and go on
            self.stats.dropped += len(batch)
            log.error("metrics_batch_failed", points=len(batch), error=repr(error))
        if self.on_drained is not None:
            self.on_drained(len(self._points))


class _Connection(asyncio.Protocol):
    """One writer of the channel: splits its bytes into lines and parses each."""

    def __init__(self, channel: MetricsChannel) -> None:
        self._channel = channel
        self._partial = b""
        self._discarding = False  # inside an oversized line: drop bytes until its newline
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._channel._opened(self)

    def data_received(self, data: bytes) -> None:
        limit = self._channel.max_line_bytes
        lines = data.split(b"\n")
        tail = lines.pop()
        if self._discarding:
            if not lines:
                return  # still inside the oversized line
            lines[0] = b""  # the rest of the oversized line: already counted
            self._discarding = False
        elif self._partial:
            if lines:
                lines[0] = self._partial + lines[0]
            else:
                tail = self._partial + tail
        self._partial = b""
        if len(tail) > limit:
            self._channel.stats.count_garbage("oversized", tail)
            self._discarding = True
        else:
            self._partial = tail
        if lines:
            self._channel._lines(lines)

    def eof_received(self) -> bool | None:
        if self._partial and not self._discarding:
            # A writer that died mid-line: whatever it left still gets its chance.
            self._channel._lines([self._partial])
        self._partial = b""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._closed(self)
        if not self.closed.done():
            self.closed.set_result(None)


class MetricsChannel:
    """Serves one job's metrics socket; see the module docstring.

    Use as `async with MetricsChannel(path, on_batch) as channel:` or `start()`/`close()`;
    pass `channel.path` to the job as `CIUIC_METRICS_SOCKET`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_batch: OnBatch,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_pending: int = DEFAULT_MAX_PENDING,
        summary_k: int = DEFAULT_LAST_K,
    ) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"metrics socket path is {len(os.fsencode(self.path))} bytes, longer than the "
                f"{MAX_SOCKET_PATH_BYTES} a Unix socket allows: {self.path}"
            )
        self.max_line_bytes = max_line_bytes
        self.max_pending = max_pending
        self.stats = ChannelStats()
        self.summaries = Summaries(summary_k)
        self._batcher = PointBatcher(
            on_batch, max_batch=max_batch, interval=flush_interval, stats=self.stats
        )
        self._batcher.on_drained = self._drained
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._paused = False

    async def start(self) -> None:
        """Listen on the socket (a stale socket file at the path is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(self.path))
        self.path.chmod(0o600)  # the job runs as the agent's user; nobody else writes here
        self._batcher.start()

    async def close(self, drain_timeout: float = 2.0) -> None:
        """Stop listening, read what connected writers still send (until they close, at most
        `drain_timeout` seconds), hand every point to the callback, remove the socket."""
        if self._server is not None:
            self._server.close()
        open_ = [c.closed for c in self._connections]
        if open_:
            _, late = await asyncio.wait(open_, timeout=drain_timeout)
            if late:
                log.warning("metrics_writers_still_open", writers=len(late))
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.close()  # buffered bytes were already delivered
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self._batcher.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.stats.garbage:
            log.warning(
                "metrics_garbage",
                lines=self.stats.garbage,
                by_reason=self.stats.garbage_by_reason,
                samples=list(self.stats.garbage_samples),
            )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Points parsed but not yet handed to the callback."""
        return self._batcher.pending

    # -- called by connections -------------------------------------------------------------
    def _opened(self, conn: _Connection) -> None:
        self._connections.add(conn)
        self.stats.connections += 1
        if self._paused and conn.transport is not None:
            conn.transport.pause_reading()

    def _closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    def _lines(self, lines: list[bytes]) -> None:
        stats = self.stats
        limit = self.max_line_bytes
        validate = _validate_line
        points = MetricColumns()
        keys, steps, values, times = points.keys, points.steps, points.values, points.times
        by_key: dict[str, list[float]] = {}
        arrived = time.time()
        for line in lines:
            if len(line) > limit:
                stats.count_garbage("oversized", line)
                continue
            try:
                point = validate(line)
            except ValidationError as error:
                if line.strip():  # blank lines are harmless: not garbage, not points
                    stats.count_garbage(_reason(error), line)
                continue
            key = point["key"]
            value = point["value"]
            keys.append(key)
            steps.append(point["step"])
            values.append(value)
            times.append(point.get("ts", arrived))
            same_key = by_key.get(key)
            if same_key is None:
                by_key[key] = [value]
            else:
                same_key.append(value)
        if keys:
            stats.points += len(keys)
            self.summaries.add_grouped(by_key)
            self._batcher.extend(points)
            if not self._paused and self._batcher.pending >= self.max_pending:
                self._paused = True
                stats.pauses += 1
                for conn in self._connections:
                    if conn.transport is not None:
                        conn.transport.pause_reading()

    def _drained(self, pending: int) -> None:
        if self._paused and pending <= self.max_pending // 2:
            self._paused = False
            for conn in self._connections:
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.resume_reading()
