"""The GPU agent against real NATS and S3, driven as the scheduler drives it: assignments are
published by hand, and the agent's events are read off the bus. Jobs run for real (git, venvs,
pip, processes, torchrun) on simulated GPUs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.msg import Msg

from ciuic_common.events import (
    AgentHeartbeat,
    AgentRegistered,
    Event,
    JobAccepted,
    JobAssigned,
    JobFinished,
    JobStarted,
    JobStop,
    JobWork,
    LogsBatch,
    MetricsBatch,
    event_for_subject,
)
from ciuic_common.servers import NatsServer, ServerProcess, free_port
from ciuic_common.service import Service
from ciuic_common.settings import S3Settings
from ciuic_common.storage import Storage
from ciuic_gpu_agent.envcache import EnvCache, cache_name, hash_files
from ciuic_gpu_agent.runner import launch_command
from ciuic_gpu_agent.service import GpuAgent, GpuAgentSettings, build_agent

pytestmark = [pytest.mark.nats, pytest.mark.s3, pytest.mark.slow]

E = TypeVar("E", bound=Event)
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cga-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def git(*args: str, cwd: Path) -> str:
    names = {"GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t"}
    env = {**os.environ, **names, "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_EMAIL": "t@x"}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


class Repo:
    """A bare repository (the `file://` URL a push would name) and a work tree to commit from."""

    def __init__(self, root: Path) -> None:
        self.work = root / "work"
        self.bare = root / "repo.git"
        self.work.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=self.work)
        git("init", "-q", "--bare", str(self.bare), cwd=root)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)
        self.url = f"file://{self.bare}"

    def commit(self, files: dict[str, str | bytes]) -> str:
        for name, content in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", "change", cwd=self.work)
        git("push", "-q", "origin", "main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


def tiny_wheel(name: str = "ciuictinypkg", version: str = "0.1") -> tuple[str, bytes]:
    """A pure-Python wheel built here, so installing it needs no network."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            wheel.writestr(path, text)
    return f"{name}-{version}-py3-none-any.whl", buffer.getvalue()


class Events:
    """Every ciuic event on the bus (core subscription: JetStream events arrive too)."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        cls = event_for_subject(msg.subject)
        if cls is not None:
            self.seen.append(cls.from_bytes(msg.data))
            self._changed.set()

    def of(self, kind: type[E], **match: Any) -> list[E]:
        return [
            e
            for e in self.seen
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait(
        self, kind: type[E], limit: float = 30.0, count: int = 1, **match: Any
    ) -> list[E]:
        deadline = time.monotonic() + limit
        while len(found := self.of(kind, **match)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                names = [type(e).__name__ for e in self.seen[-20:]]
                raise AssertionError(f"no {count} {kind.__name__} {match} in {limit}s: {names}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return found


@pytest.fixture
async def events(nats_url: str) -> AsyncIterator[Events]:
    nc = await nats.connect(nats_url)
    collected = Events()
    await nc.subscribe("ciuic.>", cb=collected.on_msg)
    yield collected
    await nc.close()


async def publish(nats_url: str, event: Event) -> None:
    from ciuic_common.bus import Bus

    bus = Bus(nats_url, name="test-scheduler")
    await bus.connect()
    try:
        await bus.publish(event)
    finally:
        await bus.broker.stop()


def settings_for(
    nats_url: str, s3: S3Settings, bucket: str, root: Path, sockets: Path, agent_id: str, **kw: Any
) -> GpuAgentSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "s3_endpoint": s3.s3_endpoint,
        "s3_access_key": s3.s3_access_key,
        "s3_secret_key": s3.s3_secret_key,
        "s3_region": s3.s3_region,
        "s3_bucket": bucket,
        "agent_id": agent_id,
        "sim_gpus": 2,
        "home": root,
        "work_dir": root / agent_id,
        "socket_dir": sockets,
        "grpc_port": 0,
        "metrics_port": 0,
        "stop_grace": 10.0,
        "checkpoint_interval": 0.5,
        "system_metrics_interval": 0.3,
        "heartbeat_interval": 0.5,
        "shutdown_grace": 5.0,
    }
    return GpuAgentSettings(**(values | kw))


@contextlib.asynccontextmanager
async def running(settings: GpuAgentSettings) -> AsyncIterator[tuple[Service, GpuAgent]]:
    service, agent = build_agent(settings)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    try:
        yield service, agent
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 60)


def assign(
    agent_id: str,
    repo: Repo,
    commit: str,
    steps: list[dict[str, Any]],
    bucket: str,
    *,
    job_id: str,
    run_id: str = "run1",
    node_rank: int = 0,
    gpus: list[int] | None = None,
    **work: Any,
) -> JobAssigned:
    return JobAssigned(
        agent_id=agent_id,
        run_id=run_id,
        job_id=job_id,
        node_rank=node_rank,
        gpus=gpus if gpus is not None else [0],
        work=JobWork(
            kind="job",
            name=job_id,
            repository=repo.url,
            commit=commit,
            steps=steps,
            output_prefix=f"s3://{bucket}/runs/{run_id}/{job_id}/",
            **work,
        ),
    )


def log_texts(events: Events, job_id: str) -> list[str]:
    return [line.text for b in events.of(LogsBatch, job_id=job_id) for line in b.lines]


def seconds_in(texts: list[str], pattern: str) -> float:
    for text in texts:
        if match := re.search(pattern, text):
            return float(match.group(1))
    raise AssertionError(f"{pattern!r} not in {texts}")


async def keys_under(storage: Storage, bucket: str, prefix: str) -> list[str]:
    return [key async for key in storage.list_keys(bucket, prefix)]


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------
def test_hash_files_is_github_actions_hash(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "requirements.txt").write_text("six\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "requirements.txt").write_text("torch\n")
    files = [tmp_path / "requirements.txt", tmp_path / "sub" / "requirements.txt"]
    expected = hashlib.sha256(
        b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)
    ).hexdigest()
    assert hash_files(tmp_path, ["**/requirements.txt"]) == expected
    assert (
        hash_files(tmp_path, ["**/requirements.txt", "!sub/**"])
        == hashlib.sha256(hashlib.sha256(b"six\n").digest()).hexdigest()
    )
    assert hash_files(tmp_path, ["nothing.txt"]) == ""
    assert cache_name("pip-" + "a" * 64).endswith(f"-py{sys.version_info[0]}.{sys.version_info[1]}")


def test_ddp_commands_go_through_torchrun() -> None:
    work = JobWork(kind="trial", name="t", repository="r", commit="c", strategy="ddp", nodes=2,
                   rendezvous="10.0.0.1:29400")  # fmt: skip
    command, env = launch_command("python train.py --lr 0.1", work, 1, 2, lambda _: None)
    assert command == (
        "python -m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 2 "
        "--master_addr 10.0.0.1 --master_port 29400 train.py --lr 0.1"
    )
    assert env["WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "10.0.0.1"
    same, env = launch_command("bash run.sh", work, 0, 1, lambda _: None)
    assert same == "bash run.sh"
    assert env["NODE_RANK"] == "0"


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
async def test_second_job_with_same_requirements_reuses_the_environment(
    nats_url: str, s3_server: S3Settings, storage: Storage, s3_bucket: str,
    tmp_path: Path, sockets: Path, events: Events,
) -> None:  # fmt: skip
    repo = Repo(tmp_path / "repo")
    wheel, data = tiny_wheel()
    commit = repo.commit(
        {f"wheels/{wheel}": data, "requirements.txt": f"./wheels/{wheel}\n", "README": "v1\n"}
    )
    steps = [
        {"run": "pip install --no-index -r requirements.txt"},
        {"cache": {"key": "${{ hashFiles('requirements.txt') }}", "paths": ["build-cache"]}},
        {"run": "python -c 'import ciuictinypkg, sys; print(\"venv\", sys.prefix)'; "
                "mkdir -p build-cache && echo kept > build-cache/marker"},
    ]  # fmt: skip
    a = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-a")
    async with running(a):
        first = assign("agent-a", repo, commit, steps, s3_bucket, job_id="j-first")
        await publish(nats_url, first)
        (done,) = await events.wait(JobFinished, 120, job_id="j-first")
        assert done.outcome == "succeeded", done.reason
        # A later commit with the same requirements file: same key, fetched into the mirror.
        commit2 = repo.commit({"README": "v2\n"})
        second = assign("agent-a", repo, commit2, steps, s3_bucket, job_id="j-second")
        await publish(nats_url, second)
        (done2,) = await events.wait(JobFinished, 60, job_id="j-second")
        assert done2.outcome == "succeeded", done2.reason
    # A second agent has no local copy: it restores the environment from S3 instead of building.
    b = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-b")
    async with running(b):
        third = assign("agent-b", repo, commit2, steps, s3_bucket, job_id="j-third")
        await publish(nats_url, third)
        (done3,) = await events.wait(JobFinished, 60, job_id="j-third")
        assert done3.outcome == "succeeded", done3.reason

    texts = {j: log_texts(events, j) for j in ("j-first", "j-second", "j-third")}
    cost = {}
    for job, lines in texts.items():
        env = seconds_in(lines, r"environment ready in ([\d.]+) s")
        pip = seconds_in(lines, r"step 1: pip install.*succeeded in ([\d.]+) s")
        cost[job] = env + pip
    first, second, third = cost["j-first"], cost["j-second"], cost["j-third"]
    print(
        f"\nenvironment + pip install: first {first:.2f} s (miss), second {second:.2f} s "
        f"(local hit), other agent {third:.2f} s (S3)"
    )
    assert any("miss: building" in t for t in texts["j-first"])
    assert any("hit on this agent" in t for t in texts["j-second"])
    assert any("hit in S3" in t for t in texts["j-third"])
    assert any("mirror fetch" in t for t in texts["j-second"])
    assert any(t.startswith("venv ") and "agent-b" in t for t in texts["j-third"])
    assert cost["j-second"] < cost["j-first"]
    assert cost["j-second"] < 30  # a sanity bound, not a timing test
    assert await keys_under(storage, s3_bucket, "cache/")


TRAIN = """
import json, os, signal, sys, time
import ciuic

hparams = json.load(open(os.environ["CIUIC_HPARAMS"]))
out = os.environ["CIUIC_OUTPUT_DIR"]
print("lr", hparams["lr"], "gpus", repr(os.environ["CUDA_VISIBLE_DEVICES"]), flush=True)
print("to stderr", file=sys.stderr, flush=True)
for step in range(20):
    ciuic.log({"training_loss": 1.0 / (step + 1), "accuracy": step / 20}, step=step)
    time.sleep(0.05)
os.makedirs(f"{out}/checkpoints", exist_ok=True)
open(f"{out}/checkpoints/last.pt", "w").write("weights")
open(f"{out}/model.txt", "w").write("final")
print("done", flush=True)
"""


async def test_logs_metrics_and_outputs_reach_the_bus_and_s3(
    nats_url: str, s3_server: S3Settings, storage: Storage, s3_bucket: str,
    tmp_path: Path, sockets: Path, events: Events,
) -> None:  # fmt: skip
    repo = Repo(tmp_path / "repo")
    commit = repo.commit({"train.py": TRAIN})
    settings = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-m")
    cli_env = {**os.environ, "CIUIC_NATS_URL": nats_url, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "ciuic_cli", "runs", "logs", "run1"]
    follower = await asyncio.create_subprocess_exec(
        *cli, "--follow", env=cli_env, stdout=asyncio.subprocess.PIPE
    )
    async with running(settings):
        job = assign(
            "agent-m", repo, commit, [{"run": "echo lr=${{ hparams.lr }}"},
                                      {"run": "python train.py"}],
            s3_bucket, job_id="j-metrics", gpus=[1], hparams={"lr": 0.01},
        )  # fmt: skip
        await publish(nats_url, job)
        await events.wait(JobAccepted, 10, job_id="j-metrics")
        await events.wait(JobStarted, 30, job_id="j-metrics")
        (done,) = await events.wait(JobFinished, 60, job_id="j-metrics")
    assert done.outcome == "succeeded", done.reason
    assert done.exit_code == 0
    assert done.started_at
    assert done.finished_at

    texts = log_texts(events, "j-metrics")
    assert "lr=0.01" in texts
    assert "lr 0.01 gpus '1'" in texts
    assert "done" in texts
    batches = events.of(LogsBatch, job_id="j-metrics")
    assert {line.stream for b in batches for line in b.lines} == {"stdout", "stderr"}
    assert all(b.node == "0@agent-m" for b in batches)

    training = [p for b in events.of(MetricsBatch, job_id="j-metrics", source="training")
                for p in b.points]  # fmt: skip
    assert sorted(p.step for p in training if p.key == "training_loss") == list(range(20))
    assert events.of(MetricsBatch, job_id="j-metrics", source="system")
    loss = done.metrics["training_loss"]
    assert loss["count"] == 20
    assert loss["min"] == pytest.approx(1 / 20)
    assert loss["max"] == 1.0
    assert done.metrics["accuracy"]["last"] == pytest.approx(19 / 20)

    prefix = "runs/run1/j-metrics/"
    keys = await keys_under(storage, s3_bucket, prefix)
    for name in ("model.txt", "checkpoints/last.pt", "logs/node-0.log"):
        assert prefix + name in keys
        assert prefix + name in done.artifacts
    full_log = (await storage.get_bytes(s3_bucket, prefix + "logs/node-0.log")).decode()
    assert "stderr | to stderr" in full_log
    assert "stdout | done" in full_log

    # `ciuic runs logs --follow` showed the lines live, with job and node...
    followed = b""
    assert follower.stdout is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            while b"job succeeded" not in followed:
                followed += await follower.stdout.read(4096)
    follower.terminate()
    await follower.wait()
    assert re.search(rb"j-metrics 0@agent-m lr 0.01 gpus", followed), followed[-2000:]
    # ...and without it, prints what is stored and exits (here: one job's).
    stored = await asyncio.create_subprocess_exec(
        *cli, "--job", "j-metrics", env=cli_env, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await asyncio.wait_for(stored.communicate(), 30)
    assert stored.returncode == 0
    assert b"j-metrics 0@agent-m done" in output


TRAPS_SIGTERM = """
import os, signal, sys, time
out = os.environ["CIUIC_OUTPUT_DIR"]
def last_checkpoint(signum, frame):
    os.makedirs(f"{out}/checkpoints", exist_ok=True)
    open(f"{out}/checkpoints/at-sigterm.pt", "w").write("saved")
    print("checkpoint written on SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, last_checkpoint)
print("training", flush=True)
time.sleep(120)
"""


async def test_stop_ends_a_running_job_within_the_grace_and_records_why(
    nats_url: str, s3_server: S3Settings, storage: Storage, s3_bucket: str,
    tmp_path: Path, sockets: Path, events: Events,
) -> None:  # fmt: skip
    repo = Repo(tmp_path / "repo")
    commit = repo.commit({"train.py": TRAPS_SIGTERM})
    settings = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-s")
    async with running(settings):
        job = assign("agent-s", repo, commit, [{"run": "python train.py"}], s3_bucket,
                     job_id="j-stop")  # fmt: skip
        await publish(nats_url, job)
        await events.wait(JobStarted, 30, job_id="j-stop")
        await until(lambda: "training" in log_texts(events, "j-stop"), 10)
        asked = time.monotonic()
        await publish(
            nats_url, JobStop(job_id="j-stop", requested_by="alerter", reason="loss is NaN")
        )
        (done,) = await events.wait(JobFinished, 30, job_id="j-stop")
        took = time.monotonic() - asked
    assert done.outcome == "stopped"
    assert done.stopped_by == "alerter"
    assert done.reason == "loss is NaN"
    assert took < settings.stop_grace
    assert "checkpoint written on SIGTERM" in log_texts(events, "j-stop")
    assert "runs/run1/j-stop/checkpoints/at-sigterm.pt" in done.artifacts


DDP_TRAIN = """
import os
import torch
import torch.distributed as dist
import ciuic

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
for step in range(5):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    if rank == 0:
        ciuic.log({"training_loss": loss.item()}, step=step)
print(f"rank {rank} of {world} finished", flush=True)
dist.barrier()  # leave together: a rank tearing gloo down early can abort the other
dist.destroy_process_group()
"""


async def test_two_node_ddp_job_trains_through_torchrun_on_two_agents(
    nats_url: str, s3_server: S3Settings, s3_bucket: str,
    tmp_path: Path, sockets: Path, events: Events,
) -> None:  # fmt: skip
    pytest.importorskip("torch")
    repo = Repo(tmp_path / "repo")
    commit = repo.commit({"train.py": DDP_TRAIN})
    rendezvous = f"127.0.0.1:{free_port()}"
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    s0 = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-d0")
    s1 = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-d1")
    async with running(s0), running(s1):
        for rank, agent in enumerate(("agent-d0", "agent-d1")):
            await publish(nats_url, assign(
                agent, repo, commit, [{"run": "python train.py"}], s3_bucket, job_id="j-ddp",
                node_rank=rank, strategy="ddp", nodes=2, gpus_per_node=1,
                rendezvous=rendezvous, env=env,
            ))  # fmt: skip
        finished = await events.wait(JobFinished, 120, count=2, job_id="j-ddp")
    by_rank = {f.node_rank: f for f in finished}
    assert {r: f.outcome for r, f in by_rank.items()} == {0: "succeeded", 1: "succeeded"}, (
        log_texts(events, "j-ddp")[-40:]
    )
    texts = log_texts(events, "j-ddp")
    assert "rank 0 of 2 finished" in texts
    assert "rank 1 of 2 finished" in texts
    assert by_rank[0].metrics["training_loss"]["count"] == 5


async def test_a_job_running_when_its_agent_died_is_reported_lost_after_restart(
    nats_url: str, s3_server: S3Settings, storage: Storage, s3_bucket: str,
    tmp_path: Path, sockets: Path, events: Events,
) -> None:  # fmt: skip
    repo = Repo(tmp_path / "repo")
    writes_pid = 'open(f"{out}/pid", "w").write(str(os.getpid())); print("training"'
    commit = repo.commit({"train.py": TRAPS_SIGTERM.replace('print("training"', writes_pid)})
    settings = settings_for(nats_url, s3_server, s3_bucket, tmp_path, sockets, "agent-r")
    env = {
        **os.environ,
        **{
            f"CIUIC_{k.upper()}": str(v)
            for k, v in settings.model_dump().items()
            if k
            in (
                "nats_url",
                "s3_endpoint",
                "s3_access_key",
                "s3_region",
                "s3_bucket",
                "work_dir",
                "socket_dir",
                "home",
                "stop_grace",
            )
        },
        "CIUIC_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        "CIUIC_GRPC_PORT": "0",
        "CIUIC_METRICS_PORT": "0",
        "CIUIC_HEARTBEAT_INTERVAL": "0.5",
    }
    command = [sys.executable, "-m", "ciuic_gpu_agent", "--agent-id", "agent-r", "--sim-gpus", "1"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env, **quiet)

    agent = start()
    try:
        await events.wait(AgentHeartbeat, 30, agent_id="agent-r")
        await publish(nats_url, assign("agent-r", repo, commit, [{"run": "python train.py"}],
                                       s3_bucket, job_id="j-lost"))  # fmt: skip
        await events.wait(JobStarted, 30, job_id="j-lost")
        pid_file = settings.agent_dir / "jobs" / "j-lost.a1.n0" / "out" / "pid"
        await until(lambda: pid_file.exists(), 10)
        job_pid = int(pid_file.read_text())
        agent.send_signal(signal.SIGKILL)  # a crash: no chance to report anything
        agent.wait(10)
        assert process_alive(job_pid)  # its own session: the job outlives the agent
        agent = start()
        (lost,) = await events.wait(JobFinished, 40, job_id="j-lost")
        registered = events.of(AgentRegistered, agent_id="agent-r")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    assert lost.outcome == "lost"
    assert "restarted" in (lost.reason or "")
    assert len(registered) == 2
    assert registered[-1].running_jobs == []
    assert not process_alive(job_pid)
    # It was stopped with SIGTERM: its last checkpoint went to S3 for the retry.
    assert "runs/run1/j-lost/checkpoints/at-sigterm.pt" in lost.artifacts


PASSED = {"nats_url", "s3_endpoint", "s3_access_key", "s3_region", "s3_bucket", "work_dir",
          "socket_dir", "home", "stop_grace"}  # fmt: skip


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]:
            return False
    return True


async def until(predicate: Callable[[], bool], limit: float) -> None:
    for _ in range(int(limit / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_a_single_process_job_runs_its_command_as_written() -> None:
    work = JobWork(kind="trial", name="t", repository="r", commit="c", strategy="ddp", nodes=1)
    assert launch_command("python train.py", work, 0, 1, lambda _: None) == ("python train.py", {})


async def test_jobs_restoring_one_key_at_once_fetch_it_once(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    notes: list[str] = []

    async def note(text: str) -> None:
        notes.append(text)

    def workdir(name: str) -> Path:
        path = tmp_path / name
        (path / "data").mkdir(parents=True)
        return path

    built = workdir("built")
    (built / "data" / "weights.bin").write_bytes(b"\x01" * 1024)
    builder = EnvCache(tmp_path / "agent-a", storage, s3_bucket)
    env = await builder.restore(
        "k", ["data"], built, tmp_path / "job-a", with_venv=False, note=note
    )
    assert env.hit == "miss"
    await builder.save(env, built, note)

    # The nodes and trials of a sweep start together on another agent.
    other = EnvCache(tmp_path / "agent-b", storage, s3_bucket)
    jobs = [workdir(f"job-{i}") for i in range(3)]
    envs = await asyncio.gather(
        *(
            other.restore("k", ["data"], job, job / "dir", with_venv=False, note=note)
            for job in jobs
        )
    )
    assert sorted(e.hit for e in envs) == ["local", "local", "s3"]
    for job in jobs:
        assert (job / "data" / "weights.bin").read_bytes() == b"\x01" * 1024
    assert not [n for n in notes if "unusable" in n]


SLOW_STEPS = """
import time
import ciuic
for step in range(30):
    ciuic.log({"training_loss": 1.0 / (step + 1)}, step=step)
    print(f"step {step}", flush=True)
    time.sleep(0.2)
"""


async def test_an_agent_rides_out_a_nats_restart_and_reports_its_job(
    s3_server: S3Settings, s3_bucket: str, tmp_path: Path, sockets: Path
) -> None:
    # A NATS of its own, restarted on the same port and store while the job runs.
    nats_root = Path(tempfile.mkdtemp(prefix="ciuic-nats-"))
    server = NatsServer(data_dir=nats_root, port=free_port(), monitor_port=free_port())
    proc = ServerProcess(server, nats_root / "nats.log").start()
    collected = Events()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await nc.subscribe("ciuic.>", cb=collected.on_msg)
    try:
        repo = Repo(tmp_path / "repo")
        commit = repo.commit({"train.py": SLOW_STEPS})
        settings = settings_for(server.url, s3_server, s3_bucket, tmp_path, sockets, "agent-n")
        async with running(settings):
            job = assign("agent-n", repo, commit, [{"run": "python train.py"}], s3_bucket,
                         job_id="j-nats")  # fmt: skip
            await publish(server.url, job)
            await collected.wait(JobStarted, 30, job_id="j-nats")
            proc.stop()
            await asyncio.sleep(1.5)
            proc = ServerProcess(server, nats_root / "nats.log").start()
            (done,) = await collected.wait(JobFinished, 60, job_id="j-nats")
            beats = len(collected.of(AgentHeartbeat, agent_id="agent-n"))
            await until(lambda: len(collected.of(AgentHeartbeat, agent_id="agent-n")) > beats, 10)
        assert done.outcome == "succeeded"
        assert done.metrics["training_loss"]["count"] == 30
        # Every point reached JetStream, those logged while NATS was down included.
        steps: set[int] = set()
        sub = await nc.jetstream().subscribe("ciuic.metrics.run1", ordered_consumer=True)
        with contextlib.suppress(TimeoutError):
            while len(steps) < 30:
                batch = MetricsBatch.from_bytes((await sub.next_msg(timeout=5)).data)
                steps |= {p.step for p in batch.points if p.key == "training_loss"}
        assert steps == set(range(30)), "no point lost to the restart"
    finally:
        await nc.close()
        proc.stop()
        shutil.rmtree(nats_root, ignore_errors=True)
