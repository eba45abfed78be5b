"""Signatures and payloads in the shapes GitHub, GitLab and Gitea document."""

from __future__ import annotations

import json

import pytest

from ciuic_common.errors import InvalidArgument
from ciuic_trigger.repos import fetch_url, repository_key
from ciuic_trigger.webhooks import (
    ZERO_SHA,
    PayloadError,
    parse,
    sign_gitea,
    sign_github,
    signature_problem,
)

BODY = b'{"ref": "refs/heads/main"}'


def test_github_signature_is_checked_against_the_body() -> None:
    good = {"X-Hub-Signature-256": sign_github("s3cret", BODY)}
    assert signature_problem("github", "s3cret", BODY, good) is None
    assert "does not match" in str(signature_problem("github", "other", BODY, good))
    assert "does not match" in str(signature_problem("github", "s3cret", BODY + b" ", good))
    assert "missing" in str(signature_problem("github", "s3cret", BODY, {}))
    sha1 = {"X-Hub-Signature-256": "sha1=abc"}
    assert "sha256=" in str(signature_problem("github", "s3cret", BODY, sha1))


def test_gitea_signature_and_gitlab_token() -> None:
    assert (
        signature_problem("gitea", "k", BODY, {"X-Gitea-Signature": sign_gitea("k", BODY)}) is None
    )
    assert signature_problem("gitea", "k", BODY, {"X-Gitea-Signature": "00"}) is not None
    assert signature_problem("gitlab", "tok", BODY, {"X-Gitlab-Token": "tok"}) is None
    assert signature_problem("gitlab", "tok", BODY, {"X-Gitlab-Token": "nope"}) is not None
    assert "missing" in str(signature_problem("gitlab", "tok", BODY, {}))


def github_push(**overrides: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "ref": "refs/heads/main",
        "before": "a" * 40,
        "after": "b" * 40,
        "forced": False,
        "repository": {
            "full_name": "org/repo",
            "clone_url": "https://github.com/org/repo.git",
            "ssh_url": "git@github.com:org/repo.git",
            "html_url": "https://github.com/org/repo",
        },
        "pusher": {"name": "alice", "email": "alice@example.com"},
        "sender": {"login": "alice"},
        "commits": [
            {
                "id": "1",
                "added": ["deepseek/new.py"],
                "modified": ["deepseek/model.py"],
                "removed": [],
            },
            {"id": "2", "added": [], "modified": ["deepseek/model.py"], "removed": ["old.txt"]},
        ],
    }
    payload.update(overrides)
    return payload


def headers(event: str = "push") -> dict[str, str]:
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def test_github_push_gives_ref_commits_pusher_and_changed_files() -> None:
    push = parse("github", headers(), json.dumps(github_push()).encode())
    assert push.event == "push"
    assert push.branch == "main"
    assert push.after == "b" * 40
    assert push.pusher == "alice"
    assert push.changed_files == ("deepseek/new.py", "deepseek/model.py", "old.txt")
    assert "https://github.com/org/repo.git" in push.repo_urls


@pytest.mark.parametrize(
    "overrides",
    [
        {"forced": True},
        {"before": ZERO_SHA},
        {
            "commits": [
                {"id": str(i), "added": [], "modified": ["x"], "removed": []} for i in range(20)
            ]
        },
    ],
    ids=["force-push", "new-branch", "truncated"],
)
def test_github_payload_that_cannot_tell_the_changed_files_says_so(
    overrides: dict[str, object],
) -> None:
    push = parse("github", headers(), json.dumps(github_push(**overrides)).encode())
    assert push.changed_files is None


def test_github_ping_and_branch_deletion() -> None:
    ping = parse("github", headers("ping"), json.dumps({"zen": "Keep it simple."}).encode())
    assert ping.event == "ping"
    deleted = parse("github", headers(), json.dumps(github_push(after=ZERO_SHA)).encode())
    assert deleted.deletes_ref


def test_gitlab_push_hook() -> None:
    payload = {
        "object_kind": "push",
        "before": "a" * 40,
        "after": "c" * 40,
        "ref": "refs/heads/main",
        "user_username": "bob",
        "project": {
            "git_http_url": "https://gitlab.example.com/org/repo.git",
            "git_ssh_url": "git@gitlab.example.com:org/repo.git",
            "web_url": "https://gitlab.example.com/org/repo",
        },
        "commits": [{"id": "c", "added": ["a.py"], "modified": [], "removed": []}],
        "total_commits_count": 1,
    }
    hdrs = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "uuid-1"}
    push = parse("gitlab", hdrs, json.dumps(payload).encode())
    assert (push.event, push.pusher, push.changed_files) == ("push", "bob", ("a.py",))
    assert push.delivery_id == "uuid-1"
    retried = parse(
        "gitlab", {**hdrs, "Idempotency-Key": "same-on-retry"}, json.dumps(payload).encode()
    )
    assert retried.delivery_id == "same-on-retry"
    payload["total_commits_count"] = 40
    assert parse("gitlab", hdrs, json.dumps(payload).encode()).changed_files is None


def test_gitea_push() -> None:
    payload = {
        "ref": "refs/heads/dev",
        "before": "a" * 40,
        "after": "d" * 40,
        "repository": {"clone_url": "http://gitea.local:3000/org/repo.git"},
        "pusher": {"login": "carol"},
        "commits": [{"id": "d", "added": [], "modified": ["README.md"], "removed": []}],
        "total_commits": 1,
    }
    hdrs = {"X-Gitea-Event": "push", "X-Gitea-Delivery": "g-1"}
    push = parse("gitea", hdrs, json.dumps(payload).encode())
    assert (push.branch, push.pusher, push.changed_files) == ("dev", "carol", ("README.md",))


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_a_payload_error(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse("github", headers(), body)


def test_a_missing_delivery_id_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="X-GitHub-Delivery"):
        parse("github", {"X-GitHub-Event": "push"}, b"{}")


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://github.com/Org/Repo.git", "github.com/org/repo"),
        ("git@github.com:org/repo.git", "github.com/org/repo"),
        ("ssh://git@github.com:22/org/repo", "github.com/org/repo"),
        ("https://bot@github.com/org/repo/", "github.com/org/repo"),
        ("file:///srv/git/repo", "file:/srv/git/repo"),
        ("/srv/git/repo/.git", "file:/srv/git/repo"),
    ],
)
def test_every_url_of_a_repository_has_the_same_key(url: str, key: str) -> None:
    assert repository_key(url) == key


def test_credentials_in_a_repository_url_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="credential helper"):
        fetch_url("https://user:token@github.com/org/repo.git")


def test_a_local_path_is_fetched_through_a_file_url() -> None:
    assert fetch_url("/srv/git/repo") == "file:///srv/git/repo"
    with pytest.raises(InvalidArgument):
        repository_key("https://github.com/")
