"""One node of one job on this agent, from acceptance to its `JobFinished`.

In order: a fresh job directory; the code at its commit (from the mirror cache); the
hyperparameters file; the init checkpoint (when its prefix holds anything); the `cache:`
entries (see `envcache`); the metrics channel; then the `run:` steps in order, each in its own
process group, with `${{ hparams.x }}` expanded, within what is left of the job's timeout. While
the steps run: metrics from the channel go out as `MetricsBatch` (source `training`), system
metrics every few seconds (source `system`), `checkpoints/` is uploaded whenever it changed, and
every output line goes to the job's log (`logs.JobLog`). At the end: everything under
`CIUIC_OUTPUT_DIR` and the full log go to S3 under the output prefix, the cache is saved after a
successful miss, and `JobFinished` reports the outcome, exit code, timings, artifact keys and
the summary of every metric.

The environment of every step (besides the agent's own, without its `CIUIC_*`/`AWS_*`
secrets): `CIUIC_RUN_ID`, `CIUIC_JOB_ID`, `CIUIC_ATTEMPT`, `CIUIC_NODE_RANK`, `CIUIC_NODES`,
`CIUIC_HPARAMS` (a JSON file), `CIUIC_OUTPUT_DIR`, `CIUIC_METRICS_SOCKET`,
`CIUIC_INIT_CHECKPOINT` (only when a checkpoint was downloaded), `CIUIC_DATA_<NAME>` (see
`_datasets`), `CUDA_VISIBLE_DEVICES` (the assigned host GPU indices, "" for none),
`PYTHONPATH` holding the SDK (`import ciuic` works in any interpreter), `PYTHONUNBUFFERED=1`
(output streams live), then the job's `env:` and the step's `env:`.

Distributed launch (`strategy: ddp`): `MASTER_ADDR`, `MASTER_PORT`, `NNODES`, `NODE_RANK`,
`NPROC_PER_NODE` and `WORLD_SIZE` (nodes x processes per node) are exported to every step, and a
step whose command starts with `python ` (or `python3 `) has that word replaced by
`python -m torch.distributed.run --nnodes N --node_rank R --nproc_per_node P --master_addr H
--master_port PORT` (the rendezvous is rank 0's agent; one node alone runs `--standalone`);
processes per node are the assigned GPUs, or 1 on CPU. Any other command runs as written, with
the variables to launch itself. `strategy: horovod` runs a `python ` command under
`horovodrun -np P` on one node; a multi-node horovod job is refused with its reason (the
assignment names only rank 0's host, and horovodrun needs every node's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from ciuic_common.errors import CiuicError
from ciuic_common.events import (
    Event,
    Inventory,
    JobAssigned,
    JobFinished,
    JobOutcome,
    JobStarted,
    JobWork,
    MetricColumns,
    MetricsBatch,
)
from ciuic_common.expressions import ExpressionError, render
from ciuic_common.logging import get_logger
from ciuic_common.storage import S3Url, Storage
from ciuic_gpu_agent.channel import MetricsChannel
from ciuic_gpu_agent.checkout import Mirrors
from ciuic_gpu_agent.envcache import EnvCache, JobEnv, render_key, venv_env
from ciuic_gpu_agent.logs import JobLog
from ciuic_gpu_agent.process import StepProcess, StepResult
from ciuic_gpu_agent.state import JobRecord, JobStateStore
from ciuic_gpu_agent.sysmetrics import SystemMetrics

__all__ = ["JobError", "JobRunner", "RunnerContext", "launch_command"]

log = get_logger(__name__)

T = TypeVar("T")
Publish = Callable[[Event], Awaitable[bool]]

_PYTHON = re.compile(r"^\s*(python(?:3(?:\.\d+)?)?)(?=\s)")
_DATA_NAME = re.compile(r"[^A-Za-z0-9]+")
#: Publishing a metrics batch is retried this long (a NATS restart) before it is dropped.
_METRICS_RETRY_FOR = 30.0


class JobError(CiuicError):
    """The job cannot run as assigned here (its reason goes into JobFinished)."""


class _Stopped(Exception):
    """A stop arrived while the job was not in a step."""


@dataclass
class RunnerContext:
    """What every job runner of an agent shares."""

    agent_id: str
    publish: Publish
    #: Publish until the bus takes it (JobFinished, JobStarted).
    publish_reliably: Publish
    storage: Storage | None
    mirrors: Mirrors
    envs: EnvCache
    state: JobStateStore
    #: The latest inventory (from the heartbeat loop), for system metrics of GPUs.
    inventory: Callable[[], Inventory | None]
    work_dir: Path
    socket_dir: Path
    #: The directory holding the SDK package `ciuic` (put on the jobs' PYTHONPATH).
    sdk_dir: Path
    #: The agent's Python's bin directory (first on PATH for jobs without a cache step).
    python_bin: Path
    stop_grace: float = 30.0
    log_interval: float = 0.2
    metrics_interval: float = 0.1
    checkpoint_interval: float = 5.0
    system_metrics_interval: float = 5.0
    keep_job_dirs: bool = False
    #: Called once the job's first process started (latency measurements, tests).
    on_started: list[Callable[[JobRunner], None]] = field(default_factory=list)


def launch_command(
    command: str, work: JobWork, node_rank: int, nproc: int, which: Callable[[str], str | None]
) -> tuple[str, dict[str, str]]:
    """The command to run for a distributed `work`, and the variables to export. Pure but for
    `which` (shutil.which)."""
    if work.strategy == "none" or (work.nodes == 1 and nproc <= 1):
        return command, {}  # one process: nothing to launch or rendezvous with
    python = _PYTHON.match(command)
    if work.strategy == "horovod":
        if which("horovodrun") is None:
            raise JobError("strategy horovod: horovodrun is not installed on this agent")
        if work.nodes > 1:
            raise JobError(
                "strategy horovod with several nodes is not supported: horovodrun needs every "
                "node's host, and the assignment names only rank 0's"
            )
        if python is None:
            return command, {}
        return f"horovodrun -np {nproc} -H localhost:{nproc} {command.lstrip()}", {}
    # ddp
    if work.nodes > 1:
        if not work.rendezvous or ":" not in work.rendezvous:
            raise JobError(f"a {work.nodes}-node ddp job needs a rendezvous host:port")
        host, _, port = work.rendezvous.rpartition(":")
        launcher = (
            f"-m torch.distributed.run --nnodes {work.nodes} --node_rank {node_rank} "
            f"--nproc_per_node {nproc} --master_addr {host} --master_port {port}"
        )
    else:
        host, port = "127.0.0.1", "29500"
        launcher = f"-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node {nproc}"
    env = {
        "MASTER_ADDR": host,
        "MASTER_PORT": port,
        "NNODES": str(work.nodes),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
        "WORLD_SIZE": str(work.nodes * nproc),
    }
    if python is None:
        return command, env
    return f"{command[: python.end()]} {launcher}{command[python.end() :]}", env


def _step_label(step: Mapping[str, Any], index: int) -> str:
    name = step.get("name")
    if name:
        return str(name)
    first = str(step.get("run", "")).strip().splitlines()
    text = first[0] if first else "cache"
    return f"{index + 1}: {text[:60]}{'...' if len(text) > 60 else ''}"


class JobRunner:
    """Runs one JobAssigned; see the module docstring."""

    def __init__(self, assigned: JobAssigned, ctx: RunnerContext) -> None:
        self.assigned = assigned
        self.work = assigned.work
        self.ctx = ctx
        self.key = f"{assigned.job_id}.a{assigned.attempt}.n{assigned.node_rank}"
        self.job_dir = ctx.work_dir / "jobs" / self.key
        self.record = JobRecord(
            run_id=assigned.run_id,
            job_id=assigned.job_id,
            attempt=assigned.attempt,
            node_rank=assigned.node_rank,
            agent_id=ctx.agent_id,
            accepted_at=datetime.now(UTC).isoformat(),
            workdir=str(self.job_dir),
            output_prefix=self.work.output_prefix,
        )
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:16]
        self.socket_path = ctx.socket_dir / f"{digest}.sock"
        self.step: StepProcess | None = None
        self.started_at: datetime | None = None
        self.finished: JobFinished | None = None
        self.env_seconds: float | None = None
        self._stop: tuple[str, str, bool] | None = None  # reason, requested_by, as lost
        self._stop_event = asyncio.Event()
        self._grace = ctx.stop_grace
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._artifacts: set[str] = set()
        self._output: S3Url | None = (
            S3Url.parse(self.work.output_prefix) if self.work.output_prefix else None
        )
        self._sync_lock = asyncio.Lock()
        self._background: set[asyncio.Future[bool]] = set()

    @property
    def job_id(self) -> str:
        return self.assigned.job_id

    @property
    def gpus(self) -> list[int]:
        return list(self.assigned.gpus)

    def live_pids(self) -> set[int]:
        """Every live process of the job (blocking: reads /proc)."""
        step = self.step
        return step.live_pids() if step is not None and not step.done else set()

    async def stop(
        self, reason: str, requested_by: str, *, lost: bool = False, grace: float | None = None
    ) -> None:
        """Stop the job: its step gets SIGTERM, the grace, then SIGKILL; no later step runs.
        `lost`: report it lost (the agent itself goes away), so the scheduler retries it."""
        if self.finished is not None or self._stop is not None:
            return
        self._stop = (reason, requested_by, lost)
        self._grace = self.ctx.stop_grace if grace is None else grace
        self._stop_event.set()
        step = self.step
        if step is not None and not step.done:
            await step.stop(reason, requested_by, self._grace)

    async def wait_stopped(self) -> None:
        await self._stop_event.wait()

    # -- the job -----------------------------------------------------------------------------
    async def run(self) -> JobFinished:
        """Run the job to its end and report it; returns the JobFinished it published."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.work.timeout_s if self.work.timeout_s else None
        await asyncio.to_thread(self._fresh_dir)
        joblog = JobLog(
            self.ctx.publish,
            self.job_dir / "node.log",
            run_id=self.assigned.run_id,
            job_id=self.job_id,
            node=f"{self.assigned.node_rank}@{self.ctx.agent_id}",
            interval=self.ctx.log_interval,
        )
        await joblog.start()
        channel = MetricsChannel(
            self.socket_path, self._publish_metrics, flush_interval=self.ctx.metrics_interval
        )
        outcome: JobOutcome = "failed"
        exit_code: int | None = None
        reason: str | None = None
        stopped_by: str | None = None
        envs: list[JobEnv] = []
        background: list[asyncio.Task[None]] = []
        channel_open = False
        try:
            src = await self._phase(self._checkout(joblog), deadline)
            env = await self._phase(self._environment(src, joblog), deadline)
            envs = await self._phase(self._caches(src, joblog), deadline)
            venv = next((e.venv for e in envs if e.venv is not None), None)
            env.update(venv_env(venv, env["PATH"]))
            await channel.start()
            channel_open = True
            background = [
                asyncio.create_task(self._sync_checkpoints_loop(), name=f"ckpt-{self.key}"),
                asyncio.create_task(self._system_metrics_loop(), name=f"sysm-{self.key}"),
            ]
            result = await self._steps(src, env, joblog, deadline)
            if result is None or result.outcome == "succeeded":
                outcome = "succeeded"
                exit_code = result.exit_code if result else 0
            else:
                outcome, exit_code = result.outcome, result.exit_code
                reason, stopped_by = result.reason, result.stopped_by
        except _Stopped:
            assert self._stop is not None
            outcome, reason, stopped_by = "stopped", self._stop[0], self._stop[1]
        except TimeoutError:
            outcome, reason = "timed_out", f"timed out after {self.work.timeout_s:g} s"
        except (CiuicError, OSError) as error:
            outcome, reason = "failed", str(error)
            await joblog.note(f"error: {error}", "stderr")
        except Exception as error:  # a bug of ours: the job still gets a report
            log.exception("job_runner_failed", job_id=self.job_id)
            outcome, reason = "failed", f"agent error: {error!r}"
        if self._stop is not None and self._stop[2]:
            outcome, reason = "lost", self._stop[0]
        if outcome == "stopped" and stopped_by is None and self._stop is not None:
            stopped_by = self._stop[1]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if channel_open:
            await channel.close()
        return await self._finish(joblog, channel, envs, outcome, exit_code, reason, stopped_by)

    async def _phase(self, coro: Coroutine[Any, Any, T], deadline: float | None) -> T:
        """Run a preparation phase; a stop interrupts it, the job's deadline bounds it."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop_event.wait())
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            done, _ = await asyncio.wait(
                {task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if stop in done:
            raise _Stopped
        raise TimeoutError

    def _fresh_dir(self) -> None:
        shutil.rmtree(self.job_dir, ignore_errors=True)
        (self.job_dir / "out").mkdir(parents=True)
        self.ctx.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _checkout(self, joblog: JobLog) -> Path:
        started = asyncio.get_running_loop().time()
        src = await self.ctx.mirrors.checkout(
            self.work.repository, self.work.commit, self.job_dir / "src"
        )
        took = asyncio.get_running_loop().time() - started
        await joblog.note(
            f"checkout: {self.work.repository} at {self.work.commit[:12]} "
            f"(mirror {self.ctx.mirrors.last_mirror_action}) in {took:.2f} s"
        )
        if self.work.container:
            await joblog.note(
                f"container {self.work.container!r} requested: this agent runs steps on the host"
            )
        return src

    async def _environment(self, src: Path, joblog: JobLog) -> dict[str, str]:
        """The variables every step gets (see the module docstring)."""
        a, work = self.assigned, self.work
        out = self.job_dir / "out"
        hparams = self.job_dir / "hparams.json"
        await asyncio.to_thread(hparams.write_text, json.dumps(work.hparams, indent=1))
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("CIUIC_", "AWS_"))}
        path = f"{self.ctx.python_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {
            **inherited,
            "PATH": path,
            "PYTHONPATH": str(self.ctx.sdk_dir),
            "PYTHONUNBUFFERED": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "CIUIC_RUN_ID": a.run_id,
            "CIUIC_JOB_ID": a.job_id,
            "CIUIC_ATTEMPT": str(a.attempt),
            "CIUIC_NODE_RANK": str(a.node_rank),
            "CIUIC_NODES": str(work.nodes),
            "CIUIC_HPARAMS": str(hparams),
            "CIUIC_OUTPUT_DIR": str(out),
            "CIUIC_METRICS_SOCKET": str(self.socket_path),
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in a.gpus),
        }
        env.pop("VIRTUAL_ENV", None)
        init = await self._init_checkpoint(joblog)
        if init is not None:
            env["CIUIC_INIT_CHECKPOINT"] = str(init)
        env.update(await self._datasets(src, joblog))
        env.update(work.env)
        return env

    async def _init_checkpoint(self, joblog: JobLog) -> Path | None:
        if not self.work.init_checkpoint or self.ctx.storage is None:
            return None
        url = S3Url.parse(self.work.init_checkpoint)
        prefix = url.key if url.key.endswith("/") or not url.key else url.key + "/"
        target = self.job_dir / "init"
        count = 0
        async for key in self.ctx.storage.list_keys(url.bucket, prefix):
            relative = key[len(prefix) :]
            if not relative or relative.endswith("/") or ".." in relative.split("/"):
                continue
            await self.ctx.storage.download_file(url.bucket, key, target / relative)
            count += 1
        if count == 0:
            await joblog.note(f"init checkpoint: nothing at {self.work.init_checkpoint} yet")
            return None
        await joblog.note(f"init checkpoint: {count} files from {self.work.init_checkpoint}")
        return target

    async def _datasets(self, src: Path, joblog: JobLog) -> dict[str, str]:
        """`CIUIC_DATA_<NAME>`: an s3:// version is downloaded, a path of the repository is
        given as it is; otherwise only `CIUIC_DATA_<NAME>_VERSION` (the version id) is set."""
        env: dict[str, str] = {}
        for name, version in self.work.datasets.items():
            var = "CIUIC_DATA_" + _DATA_NAME.sub("_", name).strip("_").upper()
            env[f"{var}_VERSION"] = version
            if version.startswith("s3://") and self.ctx.storage is not None:
                url = S3Url.parse(version)
                target = self.job_dir / "data" / name
                async for key in self.ctx.storage.list_keys(url.bucket, url.key):
                    relative = key[len(url.key) :].lstrip("/") or Path(key).name
                    await self.ctx.storage.download_file(url.bucket, key, target / relative)
                env[var] = str(target)
            elif (src / version).exists():
                env[var] = str(src / version)
            else:
                await joblog.note(f"dataset {name}: version {version} has no local copy here")
        return env

    async def _caches(self, src: Path, joblog: JobLog) -> list[JobEnv]:
        envs: list[JobEnv] = []
        for step in self.work.steps:
            spec = step.get("cache")
            if not isinstance(spec, Mapping):
                continue
            key = await asyncio.to_thread(render_key, str(spec.get("key", "")), src)
            paths = [str(p) for p in spec.get("paths", [])]
            env = await self.ctx.envs.restore(
                key, paths, src, self.job_dir, with_venv=not envs, note=joblog.note
            )
            envs.append(env)
            what = {
                "local": "hit on this agent",
                "s3": "hit in S3 (restored)",
                "miss": "miss: building, saved after the steps succeed",
                "busy": "miss, being built by another job: building privately",
            }[env.hit]
            await joblog.note(f"cache {env.name}: {what}; environment ready in {env.seconds:.2f} s")
        self.env_seconds = sum(e.seconds for e in envs) if envs else None
        return envs

    async def _steps(
        self, src: Path, env: dict[str, str], joblog: JobLog, deadline: float | None
    ) -> StepResult | None:
        loop = asyncio.get_running_loop()
        nproc = max(1, len(self.assigned.gpus))
        last: StepResult | None = None
        variables = {"hparams": self.work.hparams}
        for index, step in enumerate(self.work.steps):
            if "run" not in step:
                continue
            if self._stop is not None:
                raise _Stopped
            label = _step_label(step, index)
            try:
                command = render(str(step["run"]), variables)
                extra = dict(step.get("env") or {})
                step_env = {k: render(str(v), variables) for k, v in extra.items()}
            except ExpressionError as error:
                raise JobError(f"step {label}: {error}") from None
            command, launch_env = launch_command(
                command, self.work, self.assigned.node_rank, nproc, shutil.which
            )
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            process = StepProcess(
                command,
                env={**env, **launch_env, **step_env},
                cwd=src,
                on_output=joblog.add,
                timeout_s=remaining,
                timeout_grace=self.ctx.stop_grace,
            )
            await process.start()
            self.step = process
            if self._stop is not None:  # a stop that came while the step was starting
                await process.stop(self._stop[0], self._stop[1], self._grace)
            if self.started_at is None:
                self.started_at = datetime.now(UTC)
                await self._note_started()
            self.record.pgids.append(process.pid or 0)
            await asyncio.to_thread(self.ctx.state.save, self.record)
            last = await process.wait()
            await joblog.note(
                f"step {label}: {last.outcome} in {last.duration_s:.2f} s"
                + (f" ({last.reason})" if last.reason else "")
            )
            if last.outcome != "succeeded":
                return last
        return last

    async def _note_started(self) -> None:
        self.record.phase = "running"
        self.record.started_at = self.started_at.isoformat() if self.started_at else None
        for callback in self.ctx.on_started:
            callback(self)
        a = self.assigned
        event = JobStarted(
            run_id=a.run_id,
            job_id=a.job_id,
            agent_id=self.ctx.agent_id,
            attempt=a.attempt,
            node_rank=a.node_rank,
        )
        # In the background: the steps do not wait for the bus.
        task: asyncio.Future[bool] = asyncio.ensure_future(self.ctx.publish_reliably(event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- streams -----------------------------------------------------------------------------
    async def _publish_metrics(self, points: MetricColumns) -> None:
        event = MetricsBatch.from_columns(
            points, run_id=self.assigned.run_id, job_id=self.job_id, source="training"
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _METRICS_RETRY_FOR
        while True:
            try:
                await self.ctx.publish(event)
                return
            except Exception:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(0.5)

    async def _system_metrics_loop(self) -> None:
        sampler = SystemMetrics(self.assigned.gpus)
        while True:
            pids = await asyncio.to_thread(self.live_pids)
            if pids:
                points = await asyncio.to_thread(sampler.sample, pids, self.ctx.inventory())
                if points:
                    event = MetricsBatch.from_columns(
                        points, run_id=self.assigned.run_id, job_id=self.job_id, source="system"
                    )
                    try:
                        await self.ctx.publish(event)
                    except Exception as error:
                        log.warning("system_metrics_dropped", job_id=self.job_id, error=repr(error))
            await asyncio.sleep(self.ctx.system_metrics_interval)

    async def _sync_checkpoints_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.checkpoint_interval)
            try:
                await self._upload_outputs("checkpoints")
            except CiuicError as error:
                log.warning("checkpoint_upload_failed", job_id=self.job_id, error=str(error))

    async def _upload_outputs(self, under: str = "") -> None:
        """Upload what changed under the output directory (or its `under` subdirectory)."""
        if self._output is None or self.ctx.storage is None:
            return
        root = self.job_dir / "out"
        async with self._sync_lock:
            changed = await asyncio.to_thread(self._changed_files, root, under)
            for relative, stamp in changed:
                key = self._output.join(relative).key
                await self.ctx.storage.upload_file(root / relative, self._output.bucket, key)
                self._uploaded[relative] = stamp
                self._artifacts.add(key)

    def _changed_files(self, root: Path, under: str) -> list[tuple[str, tuple[int, int]]]:
        base = root / under if under else root
        changed: list[tuple[str, tuple[int, int]]] = []
        if not base.is_dir():
            return changed
        for directory, _, files in os.walk(base):
            for name in sorted(files):
                path = Path(directory) / name
                try:
                    info = path.stat()
                except OSError:
                    continue
                relative = path.relative_to(root).as_posix()
                stamp = (info.st_size, info.st_mtime_ns)
                if self._uploaded.get(relative) != stamp:
                    changed.append((relative, stamp))
        return changed

    # -- the end -----------------------------------------------------------------------------
    async def _finish(
        self,
        joblog: JobLog,
        channel: MetricsChannel,
        envs: list[JobEnv],
        outcome: JobOutcome,
        exit_code: int | None,
        reason: str | None,
        stopped_by: str | None,
    ) -> JobFinished:
        if self._output is not None and self.ctx.storage is not None:
            try:
                await self._upload_outputs()
            except CiuicError as error:
                await joblog.note(f"outputs: upload failed: {error}", "stderr")
                if outcome == "succeeded":
                    outcome, reason = "failed", f"outputs could not be uploaded: {error}"
        for env in envs:
            if outcome == "succeeded":
                await self.ctx.envs.save(env, self.job_dir / "src", joblog.note)
            else:
                await self.ctx.envs.discard(env)
        if channel.stats.garbage:
            await joblog.note(
                f"metrics channel: {channel.stats.garbage} lines were not metric points "
                f"({channel.stats.garbage_by_reason})",
                "stderr",
            )
        finished_at = datetime.now(UTC)
        await joblog.note(f"job {outcome}" + (f": {reason}" if reason else ""))
        await joblog.close()
        if self._output is not None and self.ctx.storage is not None:
            key = self._output.join("logs", f"node-{self.assigned.node_rank}.log").key
            try:
                await self.ctx.storage.upload_file(joblog.path, self._output.bucket, key)
                self._artifacts.add(key)
            except CiuicError as error:
                log.warning("job_log_upload_failed", job_id=self.job_id, error=str(error))
        a = self.assigned
        event = JobFinished(
            run_id=a.run_id,
            job_id=a.job_id,
            agent_id=self.ctx.agent_id,
            attempt=a.attempt,
            node_rank=a.node_rank,
            outcome=outcome,
            exit_code=exit_code,
            reason=reason,
            stopped_by=stopped_by,
            started_at=self.started_at,
            finished_at=finished_at,
            artifacts=sorted(self._artifacts),
            metrics=channel.summaries.as_dict(),
        )
        self.finished = event
        self.record.phase = "finished"
        self.record.finished = event.model_dump(mode="json")
        await asyncio.to_thread(self.ctx.state.save, self.record)
        await self.ctx.publish_reliably(event)
        await asyncio.to_thread(self.ctx.state.remove, self.record)
        if not self.ctx.keep_job_dirs:
            await asyncio.to_thread(shutil.rmtree, self.job_dir, True)
        log.info("job_finished", job_id=a.job_id, outcome=outcome, reason=reason)
        return event
