"""Ingestion: MetricsBatch events into PostgreSQL, several batches per transaction.

Each delivered batch waits in `Ingestor.on_batch` while a writer stores it together with the
batches that arrived meanwhile (group commit: the busier the bus, the bigger the transaction,
with no timer adding latency when it is quiet). The handler returns, and the bus acknowledges,
only after the transaction committed. One transaction:

1. records the batches' event ids; ids recorded before (a redelivery) are skipped;
2. COPYs the points into `points` (keyed by series and step), read straight from the batches'
   columns (no object per point); should a (series, step) exist already (a step logged twice,
   a batch re-sent under a new id), the points go in through a staging table instead, keeping
   the stored value, and only what was inserted counts;
3. folds the points into the series summaries and the rollups (one statement each);
4. NOTIFYs the runs concerned, for live streams on every replica.

Should a transaction fail, its batches are retried one transaction each, so one bad batch (a
step out of range, say) fails alone and reaches the dead-letter subject on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter, Histogram

from ciuic_common.db import Database
from ciuic_common.events import MetricsBatch
from ciuic_common.logging import get_logger
from ciuic_metrics_collector import store
from ciuic_metrics_collector.rollups import ROLLUP_WIDTHS, SeriesDelta, summarise
from ciuic_metrics_collector.store import PointRecord, SeriesKey

__all__ = ["Ingestor"]

log = get_logger(__name__)

POINTS = Counter("ciuic_metrics_points_stored_total", "Metric points stored")
DUPLICATES = Counter(
    "ciuic_metrics_batches_duplicate_total", "Redelivered batches recognised and skipped"
)
TXN_POINTS = Histogram(
    "ciuic_metrics_points_per_transaction",
    "Points stored per ingest transaction",
    buckets=(100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000),
)
TXN_SECONDS = Histogram("ciuic_metrics_ingest_seconds", "Time per ingest transaction")


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Waiting:
    event: MetricsBatch
    done: asyncio.Future[None] = field(default_factory=_future)


class Ingestor:
    """Stores MetricsBatch events in groups; `on_batch` is the bus handler."""

    def __init__(
        self,
        db: Database,
        *,
        max_points: int = 20_000,
        writers: int = 1,
        widths: Sequence[int] = ROLLUP_WIDTHS,
    ) -> None:
        self.db = db
        self.max_points = max_points
        self.writers = max(1, writers)
        self.widths = tuple(widths)
        self._queue: deque[_Waiting] = deque()
        self._wake = asyncio.Event()
        self._series: dict[SeriesKey, int] = {}
        self._intern_lock = asyncio.Lock()
        # Transactions commit in the order their groups were taken (see `store`).
        self._tickets = 0
        self._finished = 0  # every ticket below this one has ended
        self._ended: set[int] = set()
        self._order = asyncio.Condition()

    async def on_batch(self, event: MetricsBatch) -> None:
        """Return once the batch is committed (or was stored before); raise if it cannot be."""
        if not event.keys:
            return
        waiting = _Waiting(event)
        self._queue.append(waiting)
        self._wake.set()
        await waiting.done

    async def run(self) -> None:
        """The writers, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(self.writers):
                group.create_task(self._writer(), name=f"metrics-writer-{i}")

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            group = self._take()
            if not group:
                self._wake.clear()
                continue
            ticket, self._tickets = self._tickets, self._tickets + 1
            try:
                await self._store_group(group, ticket)
            except asyncio.CancelledError:
                for w in group:
                    if not w.done.done():
                        w.done.set_exception(RuntimeError("the collector is shutting down"))
                raise
            finally:
                # Even when the group failed before its turn, later tickets must not wait.
                await self._end(ticket)

    def _take(self) -> list[_Waiting]:
        """The oldest waiting batches, up to `max_points` points (at least one batch)."""
        taken: list[_Waiting] = []
        points = 0
        queue = self._queue
        while queue and (not taken or points + len(queue[0].event.keys) <= self.max_points):
            w = queue.popleft()
            taken.append(w)
            points += len(w.event.keys)
        return taken

    async def _store_group(self, group: list[_Waiting], ticket: int) -> None:
        try:
            await self.store([w.event for w in group], ticket)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], exc)
                return
            log.warning("metrics_group_failed", batches=len(group), error=repr(exc))
            for w in group:  # one at a time: only a bad batch fails
                try:
                    await self.store([w.event])
                except Exception as single:
                    _settle(w, single)
                else:
                    _settle(w, None)
            return
        for w in group:
            _settle(w, None)

    async def store(self, events: Sequence[MetricsBatch], ticket: int | None = None) -> int:
        """Store these batches in one transaction; returns how many points were new.

        The points are prepared first (pure Python, overlapping another writer's transaction);
        the transactions of tickets then run one after the other in ticket order, so a series'
        points become visible in the order they arrived (what live streams rely on).
        """
        started = time.perf_counter()
        ids = await self._series_ids(events)
        columns = _columns(events, ids)
        records = _records(columns)
        deltas = self._deltas(columns)
        async with self._turn(ticket), self.db.transaction() as tx:
            fresh = await store.claim_batches(tx, [e.event_id for e in events])
            if len(fresh) < len(events):
                DUPLICATES.inc(len(events) - len(fresh))
                events = [e for e in events if e.event_id in fresh]
                if not events:
                    return 0
                columns = _columns(events, ids)
                records = _records(columns)
                deltas = self._deltas(columns)
            try:
                async with tx.transaction():  # a savepoint: a duplicate step undoes only the COPY
                    await store.copy_points(tx, records)
            except asyncpg.UniqueViolationError:
                inserted = await store.insert_new_points(tx, records)
                log.info(
                    "metrics_steps_repeated", points=len(records), kept=len(records) - len(inserted)
                )
                records = inserted
                deltas = self._deltas(_columns_of(inserted))
            if deltas:
                await store.apply_deltas(tx, deltas)
            await store.notify(tx, {e.run_id for e in events})
        POINTS.inc(len(records))
        TXN_POINTS.observe(len(records))
        TXN_SECONDS.observe(time.perf_counter() - started)
        return len(records)

    def _deltas(self, columns: Columns) -> dict[int, SeriesDelta]:
        return {
            sid: summarise(steps, values, times, self.widths)
            for sid, (steps, values, times) in columns.items()
            if steps
        }

    @contextlib.asynccontextmanager
    async def _turn(self, ticket: int | None) -> AsyncIterator[None]:
        """Wait until every earlier ticket's transaction ended; None waits for nothing."""
        if ticket is None:
            yield
            return
        try:
            async with self._order:
                await self._order.wait_for(lambda: self._finished == ticket)
            yield
        finally:
            await self._end(ticket)

    async def _end(self, ticket: int) -> None:
        """Let the next ticket's transaction go (idempotent)."""
        if ticket < self._finished:
            return
        self._ended.add(ticket)
        async with self._order:
            while self._finished in self._ended:
                self._ended.discard(self._finished)
                self._finished += 1
            self._order.notify_all()

    async def _series_ids(self, events: Sequence[MetricsBatch]) -> dict[SeriesKey, int]:
        """Series ids for every (run, job, key) of these batches: cached, or interned in a
        transaction of their own (so a rolled-back batch never leaves a cached id behind)."""
        wanted: dict[SeriesKey, str] = {}
        cache = self._series
        for e in events:
            for key in set(e.keys):
                k = (e.run_id, e.job_id, key)
                if k not in cache:
                    wanted[k] = e.source
        if wanted:
            async with self._intern_lock, self.db.transaction() as tx:
                cache.update(await store.intern_series(tx, wanted))
        return cache

    async def prune(self, keep_s: float) -> None:
        """Forget batch ids older than `keep_s` seconds (beyond any redelivery)."""
        async with self.db.connection() as conn:
            removed = await store.prune_batches(conn, keep_s)
        if removed:
            log.info("metrics_batch_ids_pruned", removed=removed)


Columns = dict[int, tuple[list[int], list[float], list[datetime]]]


def _columns(events: Sequence[MetricsBatch], ids: dict[SeriesKey, int]) -> Columns:
    """Points by series id, as parallel step, value and time lists in arrival order."""
    out: Columns = {}
    for e in events:
        # Where each key's points are in the batch: one dict lookup and one append a point.
        at: dict[str, list[int]] = {}
        for i, key in enumerate(e.keys):
            try:
                at[key].append(i)
            except KeyError:
                at[key] = [i]
        steps, values, times = e.steps, e.values, _datetimes(e.times)
        for key, where in at.items():
            s, v, t = out.setdefault(ids[(e.run_id, e.job_id, key)], ([], [], []))
            s.extend([steps[i] for i in where])
            v.extend([values[i] for i in where])
            t.extend([times[i] for i in where])
    return out


def _datetimes(times: list[float]) -> list[datetime]:
    """Unix seconds as datetimes (what COPY takes); the points of one log call share a time,
    so each distinct time is converted once."""
    at = {t: datetime.fromtimestamp(t, UTC) for t in set(times)}
    return list(map(at.__getitem__, times))


def _records(columns: Columns) -> list[PointRecord]:
    return list(
        itertools.chain.from_iterable(
            zip(itertools.repeat(sid, len(steps)), steps, values, times, strict=True)
            for sid, (steps, values, times) in columns.items()
        )
    )


def _columns_of(records: Sequence[PointRecord]) -> Columns:
    out: Columns = {}
    for sid, step, value, at in records:
        steps, values, times = out.setdefault(sid, ([], [], []))
        steps.append(step)
        values.append(value)
        times.append(at)
    return out


def _settle(w: _Waiting, error: BaseException | None) -> None:
    if w.done.done():
        return
    if error is None:
        w.done.set_result(None)
    else:
        w.done.set_exception(error)
