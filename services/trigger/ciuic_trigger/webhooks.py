"""What GitHub, GitLab and Gitea send: signature checks and push payloads, as pure functions.

Each provider signs differently: GitHub `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
body>`, Gitea `X-Gitea-Signature: <hex HMAC-SHA256>`, GitLab `X-Gitlab-Token: <the secret>`.
Every comparison is constant-time. A payload becomes a `Push`: the repository's URLs, the ref,
before/after commits, the pusher, and the changed files when the payload can tell them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ciuic_common.errors import InvalidArgument

Provider = Literal["github", "gitlab", "gitea"]
PROVIDERS: tuple[Provider, ...] = ("github", "gitlab", "gitea")

ZERO_SHA = "0" * 40
#: GitHub and GitLab list at most 20 commits in a push payload; beyond that the list is partial.
PAYLOAD_COMMIT_CAP = 20


class PayloadError(InvalidArgument):
    """The request is not a payload we understand (HTTP 400)."""


@dataclass(frozen=True)
class Push:
    """A push (or a ping) as the trigger needs it, whatever the provider."""

    provider: Provider
    delivery_id: str
    event: str  # push, ping, or the provider's name for anything else
    repo_urls: tuple[str, ...]
    ref: str = ""
    before: str = ""
    after: str = ""
    pusher: str = ""
    #: Files the pushed commits touched, or None when the payload cannot tell (force-push,
    #: truncated commit list, a new branch): then `git diff` decides.
    changed_files: tuple[str, ...] | None = None

    @property
    def deletes_ref(self) -> bool:
        return self.after == ZERO_SHA

    @property
    def branch(self) -> str | None:
        prefix = "refs/heads/"
        return self.ref[len(prefix) :] if self.ref.startswith(prefix) else None


def _header(headers: Mapping[str, str], name: str) -> str:
    # aiohttp's headers are case-insensitive already; plain dicts in tests may not be.
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def signature_problem(
    provider: Provider, secret: str, body: bytes, headers: Mapping[str, str]
) -> str | None:
    """Why the request is not signed with `secret`, or None when it is."""
    if provider == "gitlab":
        token = _header(headers, "X-Gitlab-Token")
        if not token:
            return "missing X-Gitlab-Token header"
        if not hmac.compare_digest(token.encode(), secret.encode()):
            return "X-Gitlab-Token does not match the repository's secret"
        return None
    name = "X-Hub-Signature-256" if provider == "github" else "X-Gitea-Signature"
    given = _header(headers, name)
    if not given:
        return f"missing {name} header"
    if provider == "github":
        if not given.startswith("sha256="):
            return f"{name} is not of the form sha256=<hex>"
        given = given[len("sha256=") :]
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.strip().lower().encode(), expected.encode()):
        return f"{name} does not match the body signed with the repository's secret"
    return None


def sign_github(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 value GitHub would send (for tests, the demo and benchmarks)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sign_gitea(secret: str, body: bytes) -> str:
    """The X-Gitea-Signature value Gitea would send."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse(provider: Provider, headers: Mapping[str, str], body: bytes) -> Push:
    """Read the provider's event type, delivery id and payload into a `Push`."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"the body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PayloadError("the body is not a JSON object")
    if provider == "github":
        return _github(headers, payload)
    if provider == "gitlab":
        return _gitlab(headers, payload)
    return _gitea(headers, payload)


def _required_delivery(headers: Mapping[str, str], *names: str) -> str:
    for name in names:
        if value := _header(headers, name):
            return value
    raise PayloadError(f"missing delivery id header ({' or '.join(names)})")


def _urls(*candidates: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(u for u in candidates if isinstance(u, str) and u))


def _files(commits: Any) -> tuple[str, ...]:
    """The union of the files every commit added, modified or removed, in first-seen order."""
    seen: dict[str, None] = {}
    for commit in commits if isinstance(commits, list) else []:
        if not isinstance(commit, dict):
            continue
        for kind in ("added", "modified", "removed"):
            for path in commit.get(kind) or []:
                if isinstance(path, str):
                    seen.setdefault(path, None)
    return tuple(seen)


def _str(payload: Mapping[str, Any], *path: str) -> str:
    node: Any = payload
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, str) else ""


def _known_files(
    payload: Mapping[str, Any], *, forced: bool, total: int | None
) -> tuple[str, ...] | None:
    """The payload's changed files, or None when they cannot be trusted to be complete."""
    commits = payload.get("commits")
    if not isinstance(commits, list) or forced:
        return None
    before = payload.get("before")
    if before == ZERO_SHA or not commits:  # a new branch: the commits are not the whole diff
        return None
    if len(commits) >= PAYLOAD_COMMIT_CAP or (total is not None and total > len(commits)):
        return None
    return _files(commits)


def _github(headers: Mapping[str, str], payload: Mapping[str, Any]) -> Push:
    event = _header(headers, "X-GitHub-Event") or "unknown"
    delivery = _required_delivery(headers, "X-GitHub-Delivery")
    repo = payload.get("repository") or {}
    urls = _urls(repo.get("clone_url"), repo.get("ssh_url"), repo.get("html_url"),
                 repo.get("git_url"), repo.get("url"))  # fmt: skip
    if event != "push":
        return Push("github", delivery, event, urls)
    return Push(
        "github",
        delivery,
        "push",
        urls,
        ref=_str(payload, "ref"),
        before=_str(payload, "before"),
        after=_str(payload, "after"),
        pusher=_str(payload, "pusher", "name") or _str(payload, "sender", "login"),
        changed_files=_known_files(payload, forced=bool(payload.get("forced")), total=None),
    )


def _gitlab(headers: Mapping[str, str], payload: Mapping[str, Any]) -> Push:
    kind = _header(headers, "X-Gitlab-Event") or "unknown"
    # Idempotency-Key stays the same across GitLab's retries; older releases send only the UUID.
    delivery = _required_delivery(headers, "Idempotency-Key", "X-Gitlab-Event-UUID")
    project = payload.get("project") or {}
    repo = payload.get("repository") or {}
    urls = _urls(project.get("git_http_url"), project.get("git_ssh_url"),
                 project.get("web_url"), repo.get("git_http_url"), repo.get("git_ssh_url"),
                 repo.get("homepage"), repo.get("url"))  # fmt: skip
    if kind != "Push Hook" or payload.get("object_kind") != "push":
        return Push("gitlab", delivery, kind, urls)
    total = payload.get("total_commits_count")
    return Push(
        "gitlab",
        delivery,
        "push",
        urls,
        ref=_str(payload, "ref"),
        before=_str(payload, "before"),
        after=_str(payload, "after"),
        pusher=_str(payload, "user_username") or _str(payload, "user_name"),
        changed_files=_known_files(
            payload, forced=False, total=total if isinstance(total, int) else None
        ),
    )


def _gitea(headers: Mapping[str, str], payload: Mapping[str, Any]) -> Push:
    event = _header(headers, "X-Gitea-Event") or "unknown"
    delivery = _required_delivery(headers, "X-Gitea-Delivery")
    repo = payload.get("repository") or {}
    urls = _urls(repo.get("clone_url"), repo.get("ssh_url"), repo.get("html_url"))
    if event != "push":
        return Push("gitea", delivery, event, urls)
    total = payload.get("total_commits")
    return Push(
        "gitea",
        delivery,
        "push",
        urls,
        ref=_str(payload, "ref"),
        before=_str(payload, "before"),
        after=_str(payload, "after"),
        pusher=_str(payload, "pusher", "login") or _str(payload, "pusher", "username"),
        changed_files=_known_files(
            payload, forced=False, total=total if isinstance(total, int) else None
        ),
    )
