"""One job node's log: lines to the bus in batches, and the whole of it to a file, then S3.

Every line a step prints (and every line the agent itself writes about the job, prefixed
`[ciuic]`) is appended to `node.log` in the job's directory and queued for the bus. A flusher
publishes what is queued as one `LogsBatch` on `ciuic.logs.<run_id>` at least every
`interval` (200 ms) and as soon as `max_batch` lines wait. When the bus is away (a NATS
restart) batches are retried in order; past `max_pending` lines the oldest are dropped from the
live stream (never from the file) and the count is logged, so a chatty job cannot exhaust the
agent's memory. At the end `close()` flushes, and the file is uploaded to
`<output_prefix>logs/node-<rank>.log`: the complete log, whatever the live stream lost.

File lines read `2024-05-01T12:00:00.123456+00:00 stdout | text`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from ciuic_common.events import LogLine, LogsBatch
from ciuic_common.logging import get_logger

__all__ = ["JobLog"]

log = get_logger(__name__)

Publish = Callable[[LogsBatch], Awaitable[object]]

DEFAULT_INTERVAL = 0.2
DEFAULT_MAX_BATCH = 500
DEFAULT_MAX_PENDING = 50_000
#: Seconds between tries of a batch the bus refused.
_RETRY = 1.0


class JobLog:
    """The log of one node of one job; see the module docstring."""

    def __init__(
        self,
        publish: Publish,
        path: Path,
        *,
        run_id: str,
        job_id: str,
        node: str,
        interval: float = DEFAULT_INTERVAL,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._publish = publish
        self.path = path
        self.run_id, self.job_id, self.node = run_id, job_id, node
        self.interval = interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending: list[LogLine] = []
        self._unwritten: list[str] = []
        self._file: IO[str] | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        #: Lines the live stream dropped (the file has them all).
        self.dropped = 0
        self.lines = 0
        self.batches = 0

    async def start(self) -> None:
        """Open the file and start flushing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await asyncio.to_thread(self.path.open, "a", encoding="utf-8")
        self._task = asyncio.create_task(self._run(), name=f"job-log-{self.job_id}")

    async def add(self, line: LogLine) -> None:
        """Queue one line (the StepProcess output callback)."""
        self.lines += 1
        self._unwritten.append(f"{line.timestamp.isoformat()} {line.stream} | {line.text}\n")
        self._pending.append(line)
        if len(self._pending) > self.max_pending:
            drop = len(self._pending) - self.max_pending
            del self._pending[:drop]
            self.dropped += drop
        if len(self._pending) >= self.max_batch or len(self._pending) == 1:
            self._wakeup.set()

    async def note(self, text: str, stream: Literal["stdout", "stderr"] = "stdout") -> None:
        """A line of the agent's own about this job (`[ciuic] ...`), in the same log."""
        await self.add(LogLine(timestamp=datetime.now(UTC), stream=stream, text=f"[ciuic] {text}"))

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Publish what waits (within `drain_timeout`), write and close the file."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, drain_timeout)
            except TimeoutError:
                log.warning("job_log_unpublished", job_id=self.job_id, lines=len(self._pending))
            self._task = None
        await self._write()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None
        if self.dropped:
            log.warning("job_log_lines_dropped", job_id=self.job_id, lines=self.dropped)

    async def _write(self) -> None:
        if not self._unwritten or self._file is None:
            return
        text, self._unwritten = "".join(self._unwritten), []
        file = self._file

        def write() -> None:
            file.write(text)
            file.flush()

        await asyncio.to_thread(write)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                await self._write()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first_at = loop.time()
            if len(self._pending) < self.max_batch and not self._closing:
                # Let lines gather for at most one interval after the first of them.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    while len(self._pending) < self.max_batch and not self._closing:
                        remaining = first_at + self.interval - loop.time()
                        if remaining <= 0:
                            break
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                        self._wakeup.clear()
            batch = self._pending[: self.max_batch]
            event = LogsBatch(run_id=self.run_id, job_id=self.job_id, node=self.node, lines=batch)
            await self._write()
            while True:
                try:
                    # The same event (same Nats-Msg-Id) on each try: JetStream stores it once.
                    await self._publish(event)
                    break
                except Exception as error:
                    log.warning("job_log_publish_failed", job_id=self.job_id, error=repr(error))
                    if self._closing:
                        return  # the file has everything; the S3 copy is the record
                    await asyncio.sleep(_RETRY)
            # Lines dropped meanwhile were the oldest: remove what was sent, by identity.
            sent = {id(line) for line in batch}
            self._pending = [line for line in self._pending if id(line) not in sent]
            self.batches += 1
