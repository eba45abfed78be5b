"""SQL for the `trigger` schema: repositories and deliveries."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ciuic_common.db import Connection
from ciuic_common.errors import AlreadyExists, InvalidArgument, NotFound

#: What a delivery became. `received` waits for the intake worker; the others are final.
STATUSES = ("received", "requested", "skipped", "rejected", "failed")


@dataclass(frozen=True)
class Repository:
    id: uuid.UUID
    url: str
    key: str
    secret: str
    created_at: datetime
    deliveries: int = 0
    last_delivery_at: datetime | None = None


@dataclass(frozen=True)
class Delivery:
    id: uuid.UUID
    provider: str
    delivery_id: str
    repository_id: uuid.UUID | None
    repository: str
    event: str
    ref: str
    before_sha: str
    commit_sha: str
    pusher: str
    payload_files: list[str] | None
    status: str
    reason: str
    changed_files: list[str]
    errors: list[dict[str, Any]]
    pipeline_event_id: str | None
    attempts: int
    received_at: datetime
    finished_at: datetime | None
    not_before: datetime | None = None
    body_sha256: str | None = None


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(**dict(row))


async def add_repository(
    conn: Connection, url: str, key: str, secret: str, *, replace: bool
) -> Repository:
    """Register a repository (or replace its URL and secret when `replace`)."""
    row = await conn.fetchrow(
        """INSERT INTO repositories (id, url, key, secret) VALUES ($1, $2, $3, $4)
           ON CONFLICT (key) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret
             WHERE $5
           RETURNING *""",
        uuid.uuid4(), url, key, secret, replace,
    )  # fmt: skip
    if row is None:
        raise AlreadyExists(
            f"{url} is registered already (as {key}); use --replace to change its secret"
        )
    return Repository(**dict(row))


async def list_repositories(conn: Connection) -> list[Repository]:
    rows = await conn.fetch(
        """SELECT r.*, count(d.id) AS deliveries, max(d.received_at) AS last_delivery_at
             FROM repositories r LEFT JOIN deliveries d ON d.repository_id = r.id
            GROUP BY r.id ORDER BY r.url"""
    )
    return [Repository(**dict(r)) for r in rows]


async def repository_by_keys(conn: Connection, keys: Sequence[str]) -> Repository | None:
    """The registered repository any of `keys` names."""
    row = await conn.fetchrow("SELECT * FROM repositories WHERE key = ANY($1::text[])", list(keys))
    return Repository(**dict(row)) if row else None


async def remove_repository(conn: Connection, key: str) -> None:
    if await conn.execute("DELETE FROM repositories WHERE key = $1", key) == "DELETE 0":
        raise NotFound(f"no registered repository {key}; `ciuic repos ls` lists them")


async def record_delivery(
    conn: Connection,
    *,
    provider: str,
    delivery_id: str,
    repository: Repository,
    event: str,
    ref: str = "",
    before_sha: str = "",
    commit_sha: str = "",
    pusher: str = "",
    payload_files: Sequence[str] | None = None,
    status: str = "received",
    reason: str = "",
    body_sha256: str | None = None,
) -> tuple[Delivery, bool]:
    """Store a delivery; returns it and False when the same delivery (same id, or the same
    signed body for this repository) was recorded before."""
    row = await conn.fetchrow(
        """INSERT INTO deliveries (id, provider, delivery_id, repository_id, repository, event, ref,
                                   before_sha, commit_sha, pusher, payload_files, status, reason,
                                   body_sha256, finished_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                   CASE WHEN $12 = 'received' THEN NULL ELSE now() END)
           ON CONFLICT DO NOTHING
           RETURNING *""",
        uuid.uuid4(), provider, delivery_id, repository.id, repository.url, event, ref,
        before_sha, commit_sha, pusher,
        list(payload_files) if payload_files is not None else None, status, reason, body_sha256,
    )  # fmt: skip
    if row is not None:
        return _delivery(row), True
    existing = await conn.fetchrow(
        """SELECT * FROM deliveries
            WHERE (provider = $1 AND delivery_id = $2)
               OR (repository_id = $3 AND body_sha256 = $4)
            LIMIT 1""",
        provider, delivery_id, repository.id, body_sha256,
    )  # fmt: skip
    assert existing is not None
    return _delivery(existing), False


async def claim_waiting(conn: Connection) -> Delivery | None:
    """Lock the oldest delivery waiting for intake (for the caller's transaction)."""
    row = await conn.fetchrow(
        """UPDATE deliveries SET attempts = attempts + 1
            WHERE id = (SELECT id FROM deliveries WHERE status = 'received' AND not_before <= now()
                         ORDER BY received_at LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING *"""
    )
    return _delivery(row) if row else None


async def retry_later(conn: Connection, delivery_id: uuid.UUID, seconds: float) -> None:
    """Leave a delivery waiting, not to be tried again for `seconds`."""
    await conn.execute(
        "UPDATE deliveries SET not_before = now() + make_interval(secs => $2) WHERE id = $1",
        delivery_id, seconds,
    )  # fmt: skip


async def finish_delivery(
    conn: Connection,
    delivery_id: uuid.UUID,
    *,
    status: str,
    reason: str,
    commit_sha: str | None = None,
    ref: str | None = None,
    changed_files: Sequence[str] = (),
    errors: Sequence[dict[str, Any]] = (),
    pipeline_event_id: str | None = None,
) -> Delivery:
    """Record what a delivery became."""
    assert status in STATUSES
    assert status != "received"
    row = await conn.fetchrow(
        """UPDATE deliveries
              SET status = $2, reason = $3, commit_sha = coalesce($4, commit_sha),
                  ref = coalesce($8, ref), changed_files = $5, errors = $6,
                  pipeline_event_id = $7, finished_at = now()
            WHERE id = $1 RETURNING *""",
        delivery_id, status, reason, commit_sha, list(changed_files), list(errors),
        pipeline_event_id, ref,
    )  # fmt: skip
    assert row is not None
    return _delivery(row)


def _cursor(d: Delivery) -> str:
    return base64.urlsafe_b64encode(f"{d.received_at.isoformat()}|{d.id}".encode()).decode()


async def list_deliveries(
    conn: Connection,
    *,
    limit: int,
    page_token: str = "",
    repository_id: uuid.UUID | None = None,
    status: str = "",
) -> tuple[list[Delivery], str]:
    """A page of deliveries, newest first, and the token of the next page ('' when last)."""
    if limit < 1:
        raise InvalidArgument("page_size must be positive")
    if status and status not in STATUSES:
        raise InvalidArgument(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
    after_time, after_id = None, None
    if page_token:
        try:
            time_text, id_text = base64.urlsafe_b64decode(page_token).decode().split("|")
            after_time, after_id = datetime.fromisoformat(time_text), uuid.UUID(id_text)
        except ValueError as exc:
            raise InvalidArgument("page_token is not one this server gave out") from exc
    rows = await conn.fetch(
        """SELECT * FROM deliveries
            WHERE ($1::uuid IS NULL OR repository_id = $1)
              AND ($2 = '' OR status = $2)
              AND ($3::timestamptz IS NULL OR (received_at, id) < ($3, $4))
            ORDER BY received_at DESC, id DESC LIMIT $5""",
        repository_id, status, after_time, after_id, limit + 1,
    )  # fmt: skip
    page = [_delivery(r) for r in rows[:limit]]
    return page, (_cursor(page[-1]) if len(rows) > limit else "")


async def get_delivery(conn: Connection, ident: str) -> Delivery:
    """A delivery by its id or a unique prefix of it."""
    ident = ident.strip().lower()
    if len(ident) < 4:
        raise InvalidArgument("give at least 4 characters of the delivery id")
    rows = await conn.fetch(
        "SELECT * FROM deliveries WHERE id::text LIKE $1 || '%' ORDER BY received_at DESC LIMIT 2",
        ident,
    )
    if not rows:
        raise NotFound(f"no delivery {ident}")
    if len(rows) > 1:
        raise InvalidArgument(f"{ident} names more than one delivery; give more characters")
    return _delivery(rows[0])
