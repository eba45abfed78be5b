"""The gRPC API of the trigger (`ciuic.v1.TriggerService`): repositories, runs by hand,
deliveries. Domain errors raised here become gRPC status codes in the shared interceptor."""

from __future__ import annotations

import uuid
from typing import Any

from ciuic_common.db import Database
from ciuic_common.errors import InvalidArgument, NotFound
from ciuic_common.outbox import Outbox
from ciuic_common.proto import common_pb2, trigger_pb2, trigger_pb2_grpc
from ciuic_common.rpc import timestamp
from ciuic_trigger import store
from ciuic_trigger.git import Mirrors
from ciuic_trigger.intake import settle
from ciuic_trigger.repos import fetch_url, repository_key

DEFAULT_PAGE = 50
MAX_PAGE = 500


def repository_message(repo: store.Repository) -> trigger_pb2.Repository:
    return trigger_pb2.Repository(
        id=str(repo.id),
        url=repo.url,
        key=repo.key,
        created_at=timestamp(repo.created_at),
        deliveries=repo.deliveries,
        last_delivery_at=timestamp(repo.last_delivery_at),
    )


def delivery_message(d: store.Delivery) -> trigger_pb2.Delivery:
    return trigger_pb2.Delivery(
        id=str(d.id),
        provider=d.provider,
        delivery_id=d.delivery_id,
        repository=d.repository,
        event=d.event,
        ref=d.ref,
        before=d.before_sha,
        commit=d.commit_sha,
        pusher=d.pusher,
        status=d.status,
        reason=d.reason,
        changed_files=d.changed_files,
        errors=[
            common_pb2.ErrorDetail(
                field_path=e.get("path", ""),
                line=e.get("line") or 0,
                column=e.get("column") or 0,
                message=e.get("message", ""),
            )
            for e in d.errors
        ],
        pipeline_event_id=d.pipeline_event_id or "",
        received_at=timestamp(d.received_at),
        finished_at=timestamp(d.finished_at),
    )


class TriggerApi(trigger_pb2_grpc.TriggerServiceServicer):
    """Thin: validate the request, call the store or the intake, map to messages."""

    def __init__(self, db: Database, outbox: Outbox, mirrors: Mirrors) -> None:
        self.db = db
        self.outbox = outbox
        self.mirrors = mirrors

    async def AddRepository(
        self, request: trigger_pb2.AddRepositoryRequest, context: Any
    ) -> trigger_pb2.Repository:
        if not request.secret:
            raise InvalidArgument("a webhook secret is required (it signs every delivery)")
        url = fetch_url(request.url)
        async with self.db.transaction() as tx:
            repo = await store.add_repository(
                tx, url, repository_key(url), request.secret, replace=request.replace
            )
        return repository_message(repo)

    async def ListRepositories(
        self, request: trigger_pb2.ListRepositoriesRequest, context: Any
    ) -> trigger_pb2.ListRepositoriesResponse:
        async with self.db.connection() as conn:
            repos = await store.list_repositories(conn)
        return trigger_pb2.ListRepositoriesResponse(
            repositories=[repository_message(r) for r in repos]
        )

    async def RemoveRepository(
        self, request: trigger_pb2.RemoveRepositoryRequest, context: Any
    ) -> trigger_pb2.RemoveRepositoryResponse:
        async with self.db.transaction() as tx:
            await store.remove_repository(tx, repository_key(request.url))
        return trigger_pb2.RemoveRepositoryResponse()

    async def TriggerRun(
        self, request: trigger_pb2.TriggerRunRequest, context: Any
    ) -> trigger_pb2.Delivery:
        key = repository_key(request.repository)
        async with self.db.transaction() as tx:
            repo = await store.repository_by_keys(tx, [key])
            if repo is None:
                raise NotFound(
                    f"{request.repository} is not registered; add it with `ciuic repos add`"
                )
            delivery, _ = await store.record_delivery(
                tx,
                provider="manual",
                delivery_id=str(uuid.uuid4()),
                repository=repo,
                event="push",
                ref=request.ref.strip(),
                pusher=request.requested_by,
            )
            settled = await settle(tx, self.outbox, delivery, repo.url, self.mirrors, manual=True)
        assert settled is not None  # manual runs are never left waiting
        return delivery_message(settled)

    async def ListDeliveries(
        self, request: trigger_pb2.ListDeliveriesRequest, context: Any
    ) -> trigger_pb2.ListDeliveriesResponse:
        limit = min(request.page.page_size or DEFAULT_PAGE, MAX_PAGE)
        async with self.db.connection() as conn:
            repo_id = None
            if request.repository:
                repo = await store.repository_by_keys(conn, [repository_key(request.repository)])
                if repo is None:
                    raise NotFound(f"{request.repository} is not registered")
                repo_id = repo.id
            page, token = await store.list_deliveries(
                conn,
                limit=limit,
                page_token=request.page.page_token,
                repository_id=repo_id,
                status=request.status,
            )
        return trigger_pb2.ListDeliveriesResponse(
            deliveries=[delivery_message(d) for d in page],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def GetDelivery(
        self, request: trigger_pb2.GetDeliveryRequest, context: Any
    ) -> trigger_pb2.Delivery:
        async with self.db.connection() as conn:
            return delivery_message(await store.get_delivery(conn, request.id))
