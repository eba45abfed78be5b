"""The webhook endpoint: `POST /webhooks/{github,gitlab,gitea}`.

It answers fast and does little: find the registered repository, check the signature, record the
delivery (once: a redelivery is answered 200 `duplicate`), wake the intake workers, answer 202.
Errors have one JSON shape: `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import Counter, Histogram

from ciuic_common.db import Database
from ciuic_common.errors import InvalidArgument
from ciuic_common.logging import get_logger
from ciuic_trigger import store
from ciuic_trigger.repos import repository_key
from ciuic_trigger.webhooks import PROVIDERS, PayloadError, Provider, parse, signature_problem

log = get_logger(__name__)

#: The answer is due within 10 s (GitHub's own limit); we give up a little before.
ANSWER_WITHIN = 9.0

WEBHOOKS = Counter("ciuic_webhooks_total", "Webhook requests", ["provider", "status"])
WEBHOOK_SECONDS = Histogram("ciuic_webhook_seconds", "Time to answer a webhook", ["provider"])


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


def build_app(db: Database, wake: Callable[[], None], *, max_body: int) -> web.Application:
    """The aiohttp application serving the webhook endpoints."""

    async def webhook(request: web.Request) -> web.StreamResponse:
        provider = request.match_info["provider"]
        if provider not in PROVIDERS:
            return error(404, "unknown_provider", f"no webhook {provider!r}; one of {PROVIDERS}")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(ANSWER_WITHIN):
                response = await _handle(request, provider)
        except TimeoutError:
            log.error("webhook_too_slow", provider=provider)
            response = error(503, "busy", "try again later")
            response.headers["Retry-After"] = "10"
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The database is away: nothing was recorded, so the git host should send it again.
            log.error("webhook_store_unavailable", provider=provider, error=repr(exc))
            response = error(503, "unavailable", "cannot record the delivery now; try again")
            response.headers["Retry-After"] = "30"
        WEBHOOKS.labels(provider, str(response.status)).inc()
        WEBHOOK_SECONDS.labels(provider).observe(time.perf_counter() - started)
        return response

    async def _handle(request: web.Request, provider: Provider) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", f"the body is larger than {max_body} bytes")
        try:
            push = parse(provider, request.headers, body)
        except PayloadError as exc:
            return error(400, "bad_payload", str(exc))

        keys = []
        for url in push.repo_urls:
            try:
                keys.append(repository_key(url))
            except InvalidArgument:
                continue
        async with db.connection() as conn:
            repo = await store.repository_by_keys(conn, keys)
        if repo is None:
            log.warning("webhook_unknown_repository", provider=provider, urls=push.repo_urls)
            return error(
                404, "unknown_repository",
                "this repository is not registered; register it with `ciuic repos add URL`",
                urls=list(push.repo_urls),
            )  # fmt: skip

        problem = signature_problem(provider, repo.secret, body, request.headers)
        if problem is not None:
            log.warning(
                "webhook_unauthorized", provider=provider, repository=repo.url, reason=problem,
                delivery_id=push.delivery_id, remote=request.remote,
            )  # fmt: skip
            return error(401, "bad_signature", problem)

        if push.event == "ping":
            return web.json_response({"status": "pong", "repository": repo.url})

        async with db.transaction() as tx:
            delivery, created = await store.record_delivery(
                tx,
                provider=provider,
                delivery_id=push.delivery_id,
                repository=repo,
                event=push.event,
                ref=push.ref,
                before_sha=push.before,
                commit_sha=push.after,
                pusher=push.pusher,
                payload_files=push.changed_files,
                status="received" if push.event == "push" else "skipped",
                reason="" if push.event == "push" else f"{push.event} events do not start runs",
                body_sha256=hashlib.sha256(body).hexdigest(),
            )
        if not created:
            log.info("webhook_duplicate", provider=provider, delivery_id=push.delivery_id)
            return web.json_response(
                {
                    "status": "duplicate",
                    "message": "this delivery arrived before; nothing new was started",
                    "delivery": str(delivery.id),
                    "outcome": delivery.status,
                }
            )
        if delivery.status == "received":
            wake()
        log.info(
            "webhook_accepted", provider=provider, delivery=str(delivery.id),
            repository=repo.url, ref=push.ref, commit=push.after[:12],
        )  # fmt: skip
        return web.json_response(
            {"status": "accepted", "delivery": str(delivery.id), "outcome": delivery.status},
            status=202,
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=max_body)
    app.router.add_post("/webhooks/{provider}", webhook)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Start serving `app`; returns the coroutine function that stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=False).start()
    log.info("webhooks_listening", address=f"http://{host}:{port}/webhooks/")
    return runner.cleanup
