"""The trigger service against real NATS, PostgreSQL and git repositories the tests create:
signed webhooks in the shapes GitHub, GitLab and Gitea document become exactly one
`pipeline.requested`, a skip with its reason, or a rejection with the file's errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import pytest

from ciuic_common.events import PipelineRejected, PipelineRequested
from ciuic_common.proto import common_pb2, trigger_pb2, trigger_pb2_grpc
from ciuic_common.servers import free_port
from ciuic_trigger.service import TriggerSettings, build
from ciuic_trigger.webhooks import sign_gitea, sign_github

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

SECRET = "it's-a-secret-to-everybody"
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed" / ".ciuicci.yaml"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


@dataclass
class Repo:
    path: Path

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, text in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    path = tmp_path / "deepseek-repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    r = Repo(path)
    r.commit({".ciuicci.yaml": SEED.read_text(), "README.md": "hi\n", "deepseek/model.py": "x=1\n"})
    return r


@dataclass
class Trigger:
    webhook: str
    grpc_target: str
    nats_url: str
    stub: trigger_pb2_grpc.TriggerServiceStub

    async def post(
        self, provider: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.post(
            f"{self.webhook}/webhooks/{provider}", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **headers},
        ) as response:  # fmt: skip
            return response.status, await response.json()

    async def github_push(
        self, repo: Repo, *, before: str, after: str, files: list[str],
        ref: str = "refs/heads/main", delivery: str | None = None, secret: str = SECRET,
        forced: bool = False,
    ) -> tuple[int, dict[str, Any]]:  # fmt: skip
        payload = {
            "ref": ref, "before": before, "after": after, "forced": forced,
            "repository": {"full_name": "org/deepseek", "clone_url": repo.url},
            "pusher": {"name": "alice"},
            "commits": [{"id": after, "added": [], "modified": files, "removed": []}],
        }  # fmt: skip
        body = json.dumps(payload).encode()
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign_github(secret, body),
        }
        return await self.post("github", payload, headers)

    async def delivery(self, ident: str, *, settled: bool = True) -> trigger_pb2.Delivery:
        """The delivery, once the intake has settled it."""
        for _ in range(200):
            d = await self.stub.GetDelivery(trigger_pb2.GetDeliveryRequest(id=ident))
            if d.status != "received" or not settled:
                return d
            await asyncio.sleep(0.05)
        raise AssertionError(f"delivery {ident} was not settled")

    async def events(self, subject: str) -> list[bytes]:
        nc = await nats.connect(self.nats_url)
        try:
            sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
            out = []
            while True:
                try:
                    out.append((await sub.next_msg(timeout=1.0)).data)
                except nats.errors.TimeoutError:
                    return out
        finally:
            await nc.close()


@pytest.fixture
async def trigger(
    nats_url: str, database_url: str, tmp_path: Path, repo: Repo
) -> AsyncIterator[Trigger]:
    webhook_port = free_port()
    settings = TriggerSettings(
        nats_url=nats_url, database_url=database_url, home=tmp_path / "home",
        grpc_port=0, metrics_port=0, webhook_port=webhook_port, webhook_max_body=64 * 1024,
    )  # fmt: skip
    service = build(settings)
    running = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    target = f"127.0.0.1:{service.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trigger_pb2_grpc.TriggerServiceStub(channel)
        await stub.AddRepository(
            trigger_pb2.AddRepositoryRequest(url=str(repo.path), secret=SECRET)
        )
        yield Trigger(f"http://127.0.0.1:{webhook_port}", target, nats_url, stub)
    service.request_stop()
    await asyncio.wait_for(running, 30)


async def test_a_signed_push_touching_the_model_requests_exactly_one_run(
    trigger: Trigger, repo: Repo
) -> None:
    before = repo.head()
    after = repo.commit({"deepseek/model.py": "x = 2\n"})
    delivery_id = str(uuid.uuid4())

    status, body = await trigger.github_push(
        repo, before=before, after=after, files=["deepseek/model.py"], delivery=delivery_id
    )
    assert status == 202, body
    delivery = await trigger.delivery(body["delivery"])
    assert delivery.status == "requested", delivery.reason
    assert delivery.commit == after

    # GitHub redelivers the same delivery: nothing new starts.
    status, again = await trigger.github_push(
        repo, before=before, after=after, files=["deepseek/model.py"], delivery=delivery_id
    )
    assert status == 200
    assert again["status"] == "duplicate"

    events = [
        PipelineRequested.from_bytes(m) for m in await trigger.events("ciuic.pipeline.requested")
    ]
    assert len(events) == 1
    (event,) = events
    assert (event.commit, event.ref, event.pusher) == (after, "refs/heads/main", "alice")
    assert event.changed_files == ["deepseek/model.py"]
    assert event.spec["training"]["strategy"] == "horovod"
    assert event.event_id == delivery.pipeline_event_id


async def test_a_push_touching_only_the_readme_is_skipped_with_the_reason(
    trigger: Trigger, repo: Repo
) -> None:
    before = repo.head()
    after = repo.commit({"README.md": "more words\n"})
    status, body = await trigger.github_push(repo, before=before, after=after, files=["README.md"])
    assert status == 202
    delivery = await trigger.delivery(body["delivery"])
    assert delivery.status == "skipped"
    assert "README.md" in delivery.reason
    assert await trigger.events("ciuic.pipeline.requested") == []


async def test_a_push_to_another_branch_is_skipped(trigger: Trigger, repo: Repo) -> None:
    git(repo.path, "checkout", "-q", "-b", "experiment")
    before = repo.head()
    after = repo.commit({"deepseek/model.py": "x = 3\n"})
    _status, body = await trigger.github_push(
        repo, before=before, after=after, files=["deepseek/model.py"], ref="refs/heads/experiment"
    )
    delivery = await trigger.delivery(body["delivery"])
    assert delivery.status == "skipped"
    assert "experiment" in delivery.reason


async def test_a_bad_signature_gets_401_and_records_nothing(trigger: Trigger, repo: Repo) -> None:
    after = repo.commit({"deepseek/model.py": "x = 4\n"})
    status, body = await trigger.github_push(
        repo, before="a" * 40, after=after, files=["deepseek/model.py"], secret="wrong"
    )
    assert status == 401
    assert body["error"]["code"] == "bad_signature"
    listed = await trigger.stub.ListDeliveries(trigger_pb2.ListDeliveriesRequest())
    assert list(listed.deliveries) == []


async def test_an_unsigned_or_unregistered_push_starts_nothing(
    trigger: Trigger, repo: Repo
) -> None:
    payload = {"ref": "refs/heads/main", "repository": {"clone_url": repo.url}}
    status, body = await trigger.post(
        "github", payload, {"X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1"}
    )
    assert status == 401
    assert "missing X-Hub-Signature-256" in body["error"]["message"]
    payload["repository"] = {"clone_url": "https://github.com/someone/else.git"}
    status, body = await trigger.post(
        "github", payload, {"X-GitHub-Event": "push", "X-GitHub-Delivery": "d-2"}
    )
    assert status == 404
    assert body["error"]["code"] == "unknown_repository"


async def test_a_body_over_the_limit_gets_413(trigger: Trigger, repo: Repo) -> None:
    payload = {"repository": {"clone_url": repo.url}, "padding": "x" * (100 * 1024)}
    status, body = await trigger.post(
        "github", payload, {"X-GitHub-Event": "push", "X-GitHub-Delivery": "big"}
    )
    assert status == 413
    assert body["error"]["code"] == "too_large"


async def test_github_ping_is_answered(trigger: Trigger, repo: Repo) -> None:
    payload = {"zen": "Design for failure.", "repository": {"clone_url": repo.url}}
    body = json.dumps(payload).encode()
    status, answer = await trigger.post(
        "github", payload,
        {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "p-1",
         "X-Hub-Signature-256": sign_github(SECRET, body)},
    )  # fmt: skip
    assert (status, answer["status"]) == (200, "pong")


async def test_an_invalid_pipeline_file_is_rejected_with_its_errors(
    trigger: Trigger, repo: Repo
) -> None:
    before = repo.head()
    broken = SEED.read_text().replace("values: [32, 64, 128]", "values: []")
    after = repo.commit({".ciuicci.yaml": broken, "deepseek/model.py": "x = 5\n"})
    _status, body = await trigger.github_push(
        repo, before=before, after=after, files=[".ciuicci.yaml", "deepseek/model.py"]
    )
    delivery = await trigger.delivery(body["delivery"])
    assert delivery.status == "rejected"
    (error,) = delivery.errors
    assert error.field_path.startswith("training.hyperparameters[1]")
    assert error.line > 0
    rejected = [
        PipelineRejected.from_bytes(m) for m in await trigger.events("ciuic.pipeline.rejected")
    ]
    assert [r.commit for r in rejected] == [after]


async def test_a_force_push_takes_the_changed_files_from_git(trigger: Trigger, repo: Repo) -> None:
    before = repo.head()
    after = repo.commit({"requirements.txt": "torch==2.13.0\n"})
    _status, body = await trigger.github_push(
        repo, before=before, after=after, files=["does-not-matter.md"], forced=True
    )
    delivery = await trigger.delivery(body["delivery"])
    assert delivery.status == "requested", delivery.reason
    assert list(delivery.changed_files) == ["requirements.txt"]


async def test_gitlab_and_gitea_pushes_are_understood(trigger: Trigger, repo: Repo) -> None:
    before = repo.head()
    after = repo.commit({"deepseek/model.py": "x = 6\n"})
    commits = [{"id": after, "added": [], "modified": ["deepseek/model.py"], "removed": []}]
    gitlab = {
        "object_kind": "push", "ref": "refs/heads/main", "before": before, "after": after,
        "user_username": "bob", "project": {"git_http_url": repo.url},
        "commits": commits, "total_commits_count": 1,
    }  # fmt: skip
    status, body = await trigger.post(
        "gitlab", gitlab,
        {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "gl-1", "X-Gitlab-Token": SECRET},
    )  # fmt: skip
    assert status == 202, body
    assert (await trigger.delivery(body["delivery"])).status == "requested"

    gitea = {
        "ref": "refs/heads/main", "before": before, "after": after,
        "repository": {"clone_url": repo.url}, "pusher": {"login": "carol"},
        "commits": commits, "total_commits": 1,
    }  # fmt: skip
    raw = json.dumps(gitea).encode()
    status, body = await trigger.post(
        "gitea", gitea,
        {"X-Gitea-Event": "push", "X-Gitea-Delivery": "gt-1",
         "X-Gitea-Signature": sign_gitea(SECRET, raw)},
    )  # fmt: skip
    assert status == 202, body
    delivery = await trigger.delivery(body["delivery"])
    assert (delivery.status, delivery.pusher) == ("requested", "carol")


async def test_a_run_by_hand_and_the_delivery_history(trigger: Trigger, repo: Repo) -> None:
    head = repo.head()
    delivery = await trigger.stub.TriggerRun(
        trigger_pb2.TriggerRunRequest(repository=str(repo.path), ref="main", requested_by="me")
    )
    assert delivery.status == "requested", delivery.reason
    assert (delivery.commit, delivery.ref, delivery.provider) == (head, "refs/heads/main", "manual")

    missing = await trigger.stub.TriggerRun(
        trigger_pb2.TriggerRunRequest(repository=str(repo.path), ref="nope")
    )
    assert missing.status == "failed"
    assert "'nope'" in missing.reason

    for _ in range(3):
        await trigger.stub.TriggerRun(trigger_pb2.TriggerRunRequest(repository=repo.url))
    first = await trigger.stub.ListDeliveries(
        trigger_pb2.ListDeliveriesRequest(page=common_pb2.PageRequest(page_size=2))
    )
    assert len(first.deliveries) == 2
    assert first.page.next_page_token
    rest = await trigger.stub.ListDeliveries(
        trigger_pb2.ListDeliveriesRequest(
            page=common_pb2.PageRequest(page_size=10, page_token=first.page.next_page_token)
        )
    )
    ids = [d.id for d in [*first.deliveries, *rest.deliveries]]
    assert len(ids) == len(set(ids)) == 5
    shown = await trigger.stub.GetDelivery(trigger_pb2.GetDeliveryRequest(id=delivery.id[:8]))
    assert shown.id == delivery.id


async def test_a_replayed_body_under_a_new_delivery_id_starts_nothing(
    trigger: Trigger, repo: Repo
) -> None:
    before = repo.head()
    after = repo.commit({"deepseek/model.py": "x = 7\n"})
    payload = {
        "ref": "refs/heads/main", "before": before, "after": after,
        "repository": {"clone_url": repo.url}, "pusher": {"name": "mallory"},
        "commits": [{"id": after, "added": [], "modified": ["deepseek/model.py"], "removed": []}],
    }  # fmt: skip
    body = json.dumps(payload).encode()
    signed = {"X-GitHub-Event": "push", "X-Hub-Signature-256": sign_github(SECRET, body)}
    first, _ = await trigger.post("github", payload, {**signed, "X-GitHub-Delivery": "one"})
    replay, answer = await trigger.post("github", payload, {**signed, "X-GitHub-Delivery": "two"})
    assert (first, replay, answer["status"]) == (202, 200, "duplicate")


async def test_a_git_host_that_cannot_be_reached_is_retried_not_failed(
    trigger: Trigger, repo: Repo, tmp_path: Path
) -> None:
    moved = tmp_path / "moved-away"
    before = repo.head()
    after = repo.commit({"deepseek/model.py": "x = 8\n"})
    repo.path.rename(moved)  # the remote disappears, as during an outage
    status, body = await trigger.github_push(
        repo, before=before, after=after, files=["deepseek/model.py"]
    )
    assert status == 202
    await asyncio.sleep(1.0)
    waiting = await trigger.delivery(body["delivery"], settled=False)
    assert waiting.status == "received", "kept for a later try, not failed"
