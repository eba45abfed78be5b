"""`ciuic up`, `status`, `logs` and `down`, run as a person runs them, on free ports with a
temporary CIUIC_HOME: everything comes up healthy, the data survives a restart, and nothing is
left running afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest

from ciuic_common.components import SERVICES
from ciuic_common.servers import pid_alive
from ciuic_common.settings import S3Settings
from ciuic_common.storage import Storage
from tests.e2e.stack import ciuic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def status(env: dict[str, str]) -> dict[str, dict[str, object]]:
    rows = json.loads(ciuic(env, "status", "--json", check=False).stdout)
    return {r["name"]: r for r in rows}


def test_up_status_logs_down_and_up_again_keeps_the_data(stack_env: dict[str, str]) -> None:
    ciuic(stack_env, "up")
    first = status(stack_env)
    assert {n: r["state"] for n, r in first.items()} == dict.fromkeys(first, "healthy")
    assert len(first) == 3 + len(SERVICES)
    assert ciuic(stack_env, "up").returncode == 0, "a second `up` is harmless"

    log = ciuic(stack_env, "logs", "scheduler", "-n", "5").stdout
    assert '"service_ready"' in log

    db_url = f"postgresql://postgres@127.0.0.1:{stack_env['CIUIC_POSTGRES_PORT']}/ciuic"
    s3 = S3Settings(s3_endpoint=f"http://127.0.0.1:{stack_env['CIUIC_S3_PORT']}")
    asyncio.run(write_data(db_url, s3))

    ciuic(stack_env, "down")
    pids = [int(r["pid"]) for r in first.values()]  # type: ignore[call-overload]
    assert [p for p in pids if pid_alive(p)] == [], "no process left behind"
    assert all(r["state"] == "stopped" for r in status(stack_env).values())

    ciuic(stack_env, "up")
    assert asyncio.run(read_data(db_url, s3)) == ("kept", b"kept too")


async def write_data(db_url: str, s3: S3Settings) -> None:
    conn = await asyncpg.connect(db_url)
    await conn.execute("CREATE TABLE keep (v text); INSERT INTO keep VALUES ('kept')")
    await conn.close()
    async with Storage(s3) as storage:
        await storage.ensure_bucket("keep")
        await storage.put_bytes("keep", "it", b"kept too")


async def read_data(db_url: str, s3: S3Settings) -> tuple[str, bytes]:
    conn = await asyncpg.connect(db_url)
    value = await conn.fetchval("SELECT v FROM keep")
    await conn.close()
    async with Storage(s3) as storage:
        return value, await storage.get_bytes("keep", "it")


def test_a_taken_port_is_one_clear_error_naming_component_port_and_fix(
    stack_env: dict[str, str],
) -> None:
    port = int(stack_env["CIUIC_POSTGRES_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        proc = ciuic(stack_env, "up", check=False)
    assert proc.returncode == 1
    assert f"postgres: port {port}" in proc.stderr
    assert "CIUIC_POSTGRES_PORT" in proc.stderr
    assert all(r["state"] == "stopped" for r in status(stack_env).values()), "nothing started"


def test_logs_of_an_unknown_component_lists_the_known_ones(stack_env: dict[str, str]) -> None:
    proc = ciuic(stack_env, "logs", "nope", check=False)
    assert proc.returncode == 1
    assert "no component 'nope'" in proc.stderr
    assert "scheduler" in proc.stderr


def test_a_signed_push_becomes_a_requested_run_seen_through_the_cli(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    import urllib.request
    import uuid

    from ciuic_trigger.webhooks import sign_github

    seed = Path(__file__).resolve().parents[2] / "examples" / "seed" / ".ciuicci.yaml"
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=repo, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q", "-b", "main")
    (repo / ".ciuicci.yaml").write_text(seed.read_text())
    (repo / "deepseek").mkdir()
    (repo / "deepseek" / "model.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-q", "-m", "init")
    before = git("rev-parse", "HEAD")
    (repo / "deepseek" / "model.py").write_text("x = 2\n")
    git("commit", "-qam", "change the model")
    after = git("rev-parse", "HEAD")

    ciuic(stack_env, "up")
    env = {**stack_env, "DEMO_SECRET": "shh"}
    ciuic(env, "repos", "add", str(repo), "--secret-env", "DEMO_SECRET")
    listed = json.loads(ciuic(env, "repos", "ls", "--json").stdout)
    assert [r["url"] for r in listed["repositories"]] == [repo.as_uri()]

    body = json.dumps(
        {
            "ref": "refs/heads/main", "before": before, "after": after,
            "repository": {"clone_url": repo.as_uri()}, "pusher": {"name": "alice"},
            "commits": [{"id": after, "added": [], "modified": ["deepseek/model.py"],
                         "removed": []}],
        }
    ).encode()  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack_env['CIUIC_WEBHOOK_PORT']}/webhooks/github",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sign_github("shh", body),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        delivery = json.loads(response.read())["delivery"]

    for _ in range(100):
        shown = json.loads(ciuic(env, "deliveries", "show", delivery[:8], "--json").stdout)
        if shown["status"] != "received":
            break
    assert shown["status"] == "requested", shown
    assert shown["commit"] == after

    by_hand = ciuic(env, "run", "--repo", str(repo), "--ref", "main")
    assert "requested" in by_hand.stdout
    assert "requested" in ciuic(env, "deliveries", "ls").stdout
    listed = json.loads(ciuic(env, "deliveries", "ls", "--json").stdout)["deliveries"]
    assert [d["status"] for d in listed] == ["requested", "requested"]
    assert [d["provider"] for d in listed] == ["manual", "github"]

    # The scheduler made each request a run with the seed's DAG, shown through the CLI.
    for _ in range(100):
        runs = json.loads(ciuic(env, "runs", "ls", "--json").stdout)["runs"]
        if len(runs) == 2:
            break
        time.sleep(0.1)
    assert {r["commit"] for r in runs} == {after}
    assert [s["name"] for s in runs[0]["stages"]] == [
        "setup", "training", "quick-check", "thorough-eval", "packaging", "deployment",
    ]  # fmt: skip
    shown = ciuic(env, "runs", "show", runs[0]["id"][:8]).stdout
    for stage in ("setup", "training", "quick-check", "thorough-eval", "packaging"):
        assert stage in shown
    trials = json.loads(ciuic(env, "trials", runs[0]["id"], "--json").stdout)["trials"]
    assert len(trials) == 9
