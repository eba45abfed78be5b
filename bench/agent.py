"""The GPU agent: assignment → process start, and the SDK's cost per logged point.

Against a real NATS (JetStream) and S3 (SeaweedFS) started here, one agent (simulated GPUs) in
this process:

  start latency   JobAssigned published → the job's first step process started, with a warm
                  environment cache (the job has a `cache:` step whose venv is on this agent)
                  and a warm repository mirror; `--jobs` jobs one after another. Baseline: the
                  same step started by StepProcess alone (no bus, no checkout, no cache).
  SDK per point   inside a job's training process, a loop that calls `ciuic.log` once per
                  iteration against the same loop logging nothing, both timed in the process,
                  with the agent reading the channel and publishing batches at the same time.

Targets (issue 5): start < 200 ms; SDK < 5 µs per point. Prints a table; never asserts.
Run with `make bench` or `python bench/agent.py [--jobs N] [--points N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from ciuic_common.bus import Bus
from ciuic_common.events import JobAssigned, JobFinished, JobWork, LogsBatch
from ciuic_common.logging import configure_logging
from ciuic_common.servers import NatsServer, ServerProcess, free_port
from ciuic_common.servers.seaweedfs import S3Server, free_s3_port
from ciuic_common.storage import Storage
from ciuic_gpu_agent.process import StepProcess
from ciuic_gpu_agent.service import GpuAgentSettings, build_agent

STEP = "true"
#: Inner iterations of "training" work per logged point in the realistic SDK row.
WORK = 400
SDK_LOOP = """
import os, time, ciuic
N, WORK = int(os.environ["POINTS"]), int(os.environ["WORK"])
def loop(log):
    started = time.perf_counter()
    x = 0.0
    for i in range(N):
        for _ in range(WORK):  # the "training" work of one iteration
            x = x * 0.5 + 1.0
        if log:
            ciuic.log({"training_loss": x}, step=i)
    ciuic.close()
    return time.perf_counter() - started
base, logged = [], []
for _ in range(5):
    base.append(loop(False))
    logged.append(loop(True))
print(f"BENCH{WORK} base_ns={min(base) / N * 1e9:.1f} logged_ns={min(logged) / N * 1e9:.1f}")
"""


def git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}  # fmt: skip
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_repo(root: Path) -> tuple[str, str]:
    work, bare = root / "work", root / "repo.git"
    work.mkdir(parents=True)
    (work / "requirements.txt").write_text("# nothing to install\n")
    (work / "sdk_loop.py").write_text(SDK_LOOP)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "bench", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True)
    return f"file://{bare}", sha.stdout.strip()


def assignment(
    url: str, commit: str, job_id: str, steps: list[dict[str, Any]], **work: Any
) -> JobAssigned:
    return JobAssigned(
        agent_id="bench-agent",
        run_id="bench",
        job_id=job_id,
        gpus=[0],
        work=JobWork(kind="job", name=job_id, repository=url, commit=commit, steps=steps, **work),
    )


async def baseline_spawn(n: int) -> list[float]:
    """StepProcess alone: call → process started (the floor of any agent)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        step = StepProcess(STEP)
        await step.start()
        times.append(time.perf_counter() - started)
        await step.wait()
    return times


async def run(jobs: int, points: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="ciuic-bench-agent-", dir="/tmp"))
    nats_srv = NatsServer(data_dir=root / "nats", port=free_port(), monitor_port=free_port())
    s3_srv = S3Server(data_dir=root / "s3", port=free_s3_port())
    with ServerProcess(nats_srv, root / "nats.log"), ServerProcess(s3_srv, root / "s3.log"):
        s3 = s3_srv.client_settings()
        settings = GpuAgentSettings(
            nats_url=nats_srv.url, s3_endpoint=s3.s3_endpoint, s3_access_key=s3.s3_access_key,
            s3_secret_key=s3.s3_secret_key, s3_bucket="bench-cache", agent_id="bench-agent",
            sim_gpus=1, home=root, socket_dir=root / "s", grpc_port=0, metrics_port=0,
            system_metrics_interval=1.0, log_level="WARNING",
        )  # fmt: skip
        url, commit = make_repo(root / "repo")
        service, agent = build_agent(settings)
        started_at: dict[str, float] = {}
        agent.ctx.on_started.append(lambda r: started_at.setdefault(r.job_id, time.perf_counter()))
        finished: dict[str, JobFinished] = {}
        arrived = asyncio.Event()
        lines: list[str] = []
        nc = await nats.connect(nats_srv.url)

        async def on_msg(msg: Msg) -> None:
            if msg.subject.startswith("ciuic.logs."):
                lines.extend(line.text for line in LogsBatch.from_bytes(msg.data).lines)
            elif msg.subject == "ciuic.job.finished":
                event = JobFinished.from_bytes(msg.data)
                finished[event.job_id] = event
                arrived.set()

        await nc.subscribe("ciuic.>", cb=on_msg)
        bus = Bus(nats_srv.url, name="bench-scheduler")
        await bus.connect()
        task = asyncio.create_task(service.run())
        await service.wait_ready()
        cache = {"cache": {"key": "${{ hashFiles('requirements.txt') }}", "paths": []}}
        steps = [cache, {"run": STEP}]

        async def one(job_id: str, job_steps: list[dict[str, Any]], **work: Any) -> float:
            sent = time.perf_counter()
            await bus.publish(assignment(url, commit, job_id, job_steps, **work))
            while job_id not in finished:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 300)
            assert finished[job_id].outcome == "succeeded", finished[job_id].reason
            return started_at[job_id] - sent

        cold = await one("warmup", steps)  # builds the venv and the mirror
        latencies = [await one(f"job-{i}", steps) for i in range(jobs)]
        no_cache = [await one(f"plain-{i}", [{"run": STEP}]) for i in range(jobs)]
        spawn = await baseline_spawn(jobs)
        for work in (0, WORK):
            env = {"POINTS": str(points if work == 0 else points // 10), "WORK": str(work)}
            await one(f"sdk-{work}", [{"run": "python sdk_loop.py"}], env=env)
        service.request_stop()
        await task
        await bus.broker.stop()
        await nc.close()
        async with Storage(s3):
            pass
    sdk = {}
    for text in lines:
        if match := re.match(r"BENCH(\d+) base_ns=([\d.]+) logged_ns=([\d.]+)", text):
            sdk[int(match.group(1))] = (float(match.group(2)), float(match.group(3)))

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms (p90 {sorted(values)[int(len(values) * 0.9) - 1] * 1000:.1f})"  # noqa: E501

    print(f"\nGPU agent benchmark ({os.cpu_count()} cores), {jobs} jobs per row\n")
    print(f"{'figure':<52} {'value':>26} {'target':>10}")
    print(
        f"{'assignment → process start, warm env cache':<52} {ms(latencies):>26} {'< 200 ms':>10}"
    )
    print(f"{'  same, job without a cache step':<52} {ms(no_cache):>26}")
    print(f"{'  first job (cold: venv built, mirror cloned)':<52} {cold * 1000:>23.1f} ms")
    print(f"{'  baseline: StepProcess spawn alone':<52} {ms(spawn):>26}")
    ratio = statistics.median(latencies) / statistics.median(spawn)
    print(f"{'  ratio to baseline':<52} {ratio:>25.1f}x")
    for work, label in ((WORK, "a loop doing ~tens of µs of work"), (0, "a tight loop")):
        base_ns, logged_ns = sdk[work]
        cost = (logged_ns - base_ns) / 1000
        print(f"{'SDK cost per logged point, ' + label:<52} {cost:>23.2f} µs {'< 5 µs':>10}")
        print(f"{'  baseline: the iteration logging nothing':<52} {base_ns / 1000:>23.3f} µs")
    print(
        "\n(the tight loop logs faster than the agent parses and publishes on these cores, so "
        "it\nincludes the channel's backpressure; the first row is the SDK's own cost)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per latency row")
    parser.add_argument("--points", type=int, default=100_000, help="points per SDK loop")
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    asyncio.run(run(args.jobs, args.points))


if __name__ == "__main__":
    main()
