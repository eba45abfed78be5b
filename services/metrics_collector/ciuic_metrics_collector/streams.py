"""Live streams: which runs got new points, heard from PostgreSQL on every replica.

Each ingest transaction NOTIFYs `ciuic_metrics` with the run ids it stored points for; PostgreSQL
delivers that on commit, to every replica's listener, so a stream learns of points whichever
replica ingested them. A stream holds one wake flag (a queue of at most one element: wake-ups
coalesce) and reads the new points itself, at its own pace; a slow client never makes the
collector buffer points for it, and a fast run never floods it with notifications.

Where a stream starts (`StreamMetricsRequest.after_step`, see `MetricsApi.StreamMetrics`):
`after_step >= -1` sends every series' points after that step (-1: all of them, step 0 included);
`FROM_NOW` (any value below -1) starts each series present when the stream opens after its last
stored step, and a series that appears later (a new trial) at its first point.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from typing import Final

from ciuic_common.db import Database
from ciuic_common.logging import get_logger
from ciuic_metrics_collector.store import NOTIFY_CHANNEL

__all__ = ["FROM_NOW", "Feed"]

log = get_logger(__name__)

#: `StreamMetricsRequest.after_step` for "from now"; every value below -1 means the same.
FROM_NOW: Final = -2


class Feed:
    """Wakes the streams watching a run when its points are committed."""

    def __init__(self, db: Database, *, reconnect_s: float = 1.0) -> None:
        self.db = db
        self.reconnect_s = reconnect_s
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[asyncio.Event]:
        """A flag set whenever `run_id` has new points (and when the feed reconnects)."""
        flag = asyncio.Event()
        self._watchers.setdefault(run_id, set()).add(flag)
        try:
            yield flag
        finally:
            watchers = self._watchers.get(run_id)
            if watchers is not None:
                watchers.discard(flag)
                if not watchers:
                    del self._watchers[run_id]

    def wake(self, run_id: str) -> None:
        for flag in self._watchers.get(run_id, ()):
            flag.set()

    def wake_all(self) -> None:
        for flags in self._watchers.values():
            for flag in flags:
                flag.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.wake(str(payload))

    async def run(self) -> None:
        """Listen until cancelled; after a lost connection, listen again (and wake every stream,
        since a notification may have been missed meanwhile)."""
        while True:
            lost = asyncio.Event()
            try:
                async with self.db.connection() as conn:
                    conn.add_termination_listener(functools.partial(_set, lost))
                    await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                    self.listening.set()
                    try:
                        await lost.wait()
                    finally:
                        self.listening.clear()
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            except Exception as exc:  # asyncpg's connection errors share no base but Exception
                log.warning("metrics_feed_lost", error=repr(exc))
            self.wake_all()
            await asyncio.sleep(self.reconnect_s)


def _set(flag: asyncio.Event, *_: object) -> None:
    flag.set()
