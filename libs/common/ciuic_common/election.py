"""One active replica: leader election through a JetStream key-value lock.

The lock is one key in a KV bucket whose entries expire after `ttl` seconds. The leader holds it
by rewriting it every `ttl / 3` seconds with the revision it last wrote (compare-and-set); a
standby tries to create it at the same pace, which succeeds only once the key is gone: expired
after the leader went silent, or deleted by a leader resigning on shutdown.

Each term is identified by the revision that created the lock. Revisions only grow, so the term
is a fencing token: the scheduler stores it in PostgreSQL and every change it makes checks it,
so a deposed leader that has not noticed yet cannot change anything (see ciuic_scheduler.store).
A leader that cannot renew within `ttl` steps down on its own clock before a standby can win.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from ciuic_common.logging import get_logger

__all__ = ["LeaderElection"]

log = get_logger(__name__)

Hook = Callable[[int], Awaitable[None]]


class LeaderElection:
    """Campaign for `key` in `bucket` as `identity`; `leading` is set while this replica leads."""

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        *,
        bucket: str,
        key: str,
        identity: str,
        ttl: float = 3.0,
    ) -> None:
        if ttl < 1.0:
            raise ValueError("a lock TTL under a second would depose healthy leaders")
        self._js = js
        self.bucket = bucket
        self.key = key
        self.identity = identity
        self.ttl = ttl
        self.interval = ttl / 3
        self.leading = asyncio.Event()
        #: The fencing token of the current term while leading, else None.
        self.term: int | None = None
        self._kv: KeyValue | None = None
        self._revision = 0  # the lock's revision as we last wrote it
        self._renewed_at = 0.0

    async def run(self, on_elected: Hook, on_deposed: Hook) -> None:
        """Campaign until cancelled: `on_elected(term)` on winning, `on_deposed(term)` on losing
        the lock (or on cancellation while leading, after resigning)."""
        try:
            while True:
                try:
                    await self._step(on_elected, on_deposed)
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    log.warning("election_error", bucket=self.bucket, error=repr(exc))
                    self._kv = None
                    await self._check_expiry(on_deposed)
                await asyncio.sleep(self.interval)
        finally:
            if self.term is not None:
                term = self.term
                await self._resign()
                await self._depose(on_deposed, term, "shutdown")

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._js()
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=self.bucket,
                        history=1,
                        ttl=self.ttl,
                        storage=StorageType.FILE,
                        description="leader lock: one active replica",
                    )
                )
        return self._kv

    async def _step(self, on_elected: Hook, on_deposed: Hook) -> None:
        kv = await self._bucket()
        value = self.identity.encode()
        if self.term is None:
            try:
                revision = await kv.create(self.key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                return  # someone else leads
            self.term = self._revision = revision
            self._renewed_at = time.monotonic()
            log.info("leader_elected", bucket=self.bucket, identity=self.identity, term=revision)
            self.leading.set()
            try:
                await on_elected(revision)
            except Exception as exc:
                # Could not take up the role: let another replica have it rather than hold
                # the lock doing nothing.
                log.exception("leader_start_failed", bucket=self.bucket, error=repr(exc))
                await self._resign()
                await self._depose(on_deposed, revision, "could not start leading")
            return
        try:
            revision = await kv.update(self.key, value, last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._depose(on_deposed, self.term, "lock taken or expired")
            return
        self._revision = revision
        self._renewed_at = time.monotonic()

    async def _check_expiry(self, on_deposed: Hook) -> None:
        """Unable to renew: once the lock may have expired, another replica may lead."""
        if self.term is not None and time.monotonic() - self._renewed_at > self.ttl * 0.8:
            await self._depose(on_deposed, self.term, "could not renew the lock in time")

    async def _depose(self, on_deposed: Hook, term: int, why: str) -> None:
        log.warning("leader_deposed", bucket=self.bucket, identity=self.identity, reason=why)
        self.leading.clear()
        self.term = None
        self._revision = 0
        await on_deposed(term)

    async def _resign(self) -> None:
        """Give the lock up at once, so a standby need not wait for it to expire."""
        with contextlib.suppress(Exception):
            kv = await self._bucket()
            await asyncio.wait_for(kv.delete(self.key, last=self._revision), self.interval)
