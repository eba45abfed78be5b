"""From an accepted delivery to exactly one outcome: a requested pipeline run, a skip with its
reason, or a rejection with the errors in the pipeline file.

The webhook handler only records the delivery (status `received`) and answers. Workers here
take received deliveries one at a time under a row lock, read the pipeline file at the pushed
commit from the mirror cache, validate it, apply the trigger's filters, and write the outcome and
its event through the outbox in one transaction: a crash anywhere leaves the delivery
`received`, and the next worker does it again, emitting the same event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ciuic_common.db import Connection, Database
from ciuic_common.errors import NotFound, Unavailable
from ciuic_common.events import Event, PipelineRejected, PipelineRequested, SpecIssue
from ciuic_common.globs import branch_matches, select_paths
from ciuic_common.logging import get_logger
from ciuic_common.outbox import Outbox
from ciuic_common.pipeline import Pipeline, PipelineSpecError, load_pipeline
from ciuic_trigger import store
from ciuic_trigger.git import GitError, Mirrors
from ciuic_trigger.webhooks import ZERO_SHA

log = get_logger(__name__)

PIPELINE_FILE = ".ciuicci.yaml"
MAX_PIPELINE_FILE = 1024 * 1024
#: A new branch of a monorepo can "change" every file; the event carries at most this many
#: (the delivery keeps them all), so it stays far below NATS's message size limit.
MAX_EVENT_FILES = 1000
#: Deliveries whose git host is unreachable are tried this often before they count as failed.
MAX_ATTEMPTS = 5
_EVENT_IDS = uuid.UUID("6f2c7a4e-0b1d-4c9e-9a51-3f0f8a2d6c11")


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str
    commit: str = ""
    ref: str | None = None
    changed_files: Sequence[str] = ()
    errors: Sequence[SpecIssue] = ()
    event: Event | None = None


def event_id(delivery: store.Delivery, kind: str) -> str:
    """The same delivery always yields the same event id, so a retried intake is deduplicated."""
    return str(uuid.uuid5(_EVENT_IDS, f"{delivery.id}:{kind}"))


def filter_reason(pipeline: Pipeline, branch: str | None, changed: Sequence[str]) -> str | None:
    """Why no git-push trigger of the pipeline selects this push, or None when one does."""
    triggers = [t for t in pipeline.triggers if t.type == "git-push"]
    if not triggers:
        return f"{PIPELINE_FILE} has no git-push trigger"
    if branch is None:
        return "only branch pushes start pipelines (this push was to a tag or another ref)"
    reasons = []
    for trigger in triggers:
        if not branch_matches(trigger.branches, branch):
            reasons.append(f"branch {branch!r} does not match branches {list(trigger.branches)}")
            continue
        paths = select_paths(trigger.paths, changed)
        if paths.matched:
            return None
        reasons.append(paths.reason)
    return "; ".join(reasons)


async def decide(delivery: store.Delivery, url: str, mirrors: Mirrors, *, manual: bool) -> Outcome:
    """What this delivery becomes. Raises Unavailable when git cannot be reached right now."""
    if delivery.event != "push":
        return Outcome("skipped", f"{delivery.event} events do not start pipelines")
    if delivery.commit_sha == ZERO_SHA:
        return Outcome("skipped", f"the push deleted {delivery.ref}")
    try:
        mirror = await mirrors.sync(url, want=None if manual else delivery.commit_sha)
        commit = await mirrors.resolve(mirror, delivery.commit_sha or delivery.ref)
        # By hand, `main` means refs/heads/main: later stages compare runs of the same branch.
        ref = (await mirrors.full_ref(mirror, delivery.ref) or delivery.ref) if manual else None
        raw = await mirrors.read_file(mirror, commit, PIPELINE_FILE, limit=MAX_PIPELINE_FILE)
    except (GitError, NotFound) as exc:
        return Outcome("failed", str(exc))
    full_ref = ref or delivery.ref
    if raw is None:
        return Outcome("skipped", f"no {PIPELINE_FILE} at {commit[:12]}", commit, ref)

    if delivery.payload_files is not None:
        changed = list(delivery.payload_files)
    else:
        changed = await mirrors.changed_files(mirror, delivery.before_sha, commit)

    try:
        # CPU-bound (YAML, validation): off the event loop, which keeps answering webhooks.
        pipeline = await asyncio.to_thread(load_pipeline, raw, filename=PIPELINE_FILE)
    except PipelineSpecError as exc:
        rejected = PipelineRejected(
            event_id=event_id(delivery, "rejected"),
            repository=url,
            commit=commit,
            ref=full_ref,
            delivery_id=str(delivery.id),
            errors=list(exc.issues),
        )
        summary = f"{PIPELINE_FILE} has {len(exc.issues)} error(s): {exc.issues[0].message}"
        return Outcome("rejected", summary, commit, ref, changed, exc.issues, rejected)

    heads = "refs/heads/"
    branch = full_ref.removeprefix(heads) if full_ref.startswith(heads) else None
    if not manual and (reason := filter_reason(pipeline, branch, changed)) is not None:
        return Outcome("skipped", reason, commit, ref, changed)

    requested = PipelineRequested(
        event_id=event_id(delivery, "requested"),
        repository=url,
        commit=commit,
        ref=full_ref,
        spec=pipeline.model_dump(mode="json"),
        changed_files=changed[:MAX_EVENT_FILES],
        pusher=delivery.pusher or None,
        delivery_id=str(delivery.id),
    )
    how = "by hand" if manual else f"by a push of {len(changed)} changed file(s)"
    return Outcome("requested", f"pipeline requested {how}", commit, ref, changed, (), requested)


async def settle(
    tx: Connection,
    outbox: Outbox,
    delivery: store.Delivery,
    url: str,
    mirrors: Mirrors,
    *,
    manual: bool = False,
) -> store.Delivery | None:
    """Decide a locked delivery and record the outcome (with its event) in `tx`.

    Returns None when git is unreachable and the delivery should stay waiting for a retry.
    """
    try:
        outcome = await decide(delivery, url, mirrors, manual=manual)
    except Unavailable as exc:
        if delivery.attempts < MAX_ATTEMPTS and not manual:
            wait = min(300.0, 5.0 * 2.0**delivery.attempts)
            log.warning(
                "intake_retry_later", delivery=str(delivery.id), error=str(exc), seconds=wait
            )
            await store.retry_later(tx, delivery.id, wait)
            return None
        outcome = Outcome("failed", str(exc))
    except Exception as exc:
        # A bug of ours must not retry forever nor lose the delivery: record it, loudly.
        log.exception("intake_crashed", delivery=str(delivery.id))
        outcome = Outcome("failed", f"internal error while reading the push: {exc!r}")
    if outcome.event is not None:
        await outbox.add(tx, outcome.event)
    finished = await store.finish_delivery(
        tx,
        delivery.id,
        status=outcome.status,
        reason=outcome.reason,
        commit_sha=outcome.commit or None,
        ref=outcome.ref,
        changed_files=outcome.changed_files,
        errors=[i.model_dump() for i in outcome.errors],
        pipeline_event_id=outcome.event.event_id
        if isinstance(outcome.event, PipelineRequested)
        else None,
    )
    log.info(
        "delivery_settled",
        delivery=str(delivery.id),
        provider=delivery.provider,
        status=outcome.status,
        reason=outcome.reason,
        commit=outcome.commit[:12],
    )
    return finished


class IntakeWorkers:
    """Workers that settle received deliveries; woken by the webhook handler, and polling."""

    def __init__(self, db: Database, outbox: Outbox, mirrors: Mirrors, *, workers: int = 4) -> None:
        self.db = db
        self.outbox = outbox
        self.mirrors = mirrors
        self.workers = workers
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Run the workers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(self.workers):
                group.create_task(self._work(), name=f"intake-{i}")

    async def _work(self) -> None:
        while True:
            # Cleared before looking, so a wake-up that lands while we look is not lost.
            self._wake.clear()
            try:
                busy = await self.settle_one()
            except Exception as exc:
                # PostgreSQL away for a moment, say: the delivery stays `received`; try again.
                log.warning("intake_failed", error=repr(exc))
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 2.0)
            else:
                self._wake.set()  # there may be more: let the other workers look too

    async def settle_one(self) -> bool:
        """Settle the oldest waiting delivery; False when none was waiting."""
        async with self.db.transaction() as tx:
            delivery = await store.claim_waiting(tx)
            if delivery is None:
                return False
            repo = None
            if delivery.repository_id is not None:
                repo = await tx.fetchval(
                    "SELECT url FROM repositories WHERE id = $1", delivery.repository_id
                )
            if repo is None:
                await store.finish_delivery(
                    tx, delivery.id, status="failed", reason="the repository was unregistered"
                )
                return True
            await settle(tx, self.outbox, delivery, repo, self.mirrors)
        return True
