"""Wiring of the gpu agent: settings, the bus (assignments, stops, heartbeats), job runners.

At start the agent opens its inventory (NVML, or `--sim-gpus N`), settles what a previous run
of it left behind (`state.py`: every job it had is reported finished or lost, never
forgotten), registers (`AgentRegistered`), and then:
- beats every `heartbeat_interval` (2 s) with the live inventory and its running jobs;
- on `ciuic.job.assigned.<agent_id>`: records the assignment on disk, accepts it
  (`JobAccepted`) at once, since the scheduler re-places what is not accepted within its ack
  timeout, and only then checks out, builds and runs it (`runner.py`);
- on `ciuic.job.stop.<job_id>` for one of its jobs: stops it with the grace (`stop_grace`);
  a stop that arrives before its assignment is remembered for a while and applied on arrival.
On SIGTERM it stops its jobs (within the service's shutdown grace) and reports them `lost`, so
the scheduler retries them elsewhere from their last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

import ciuic
from ciuic_common.components import service as component
from ciuic_common.errors import CiuicError
from ciuic_common.events import (
    AgentHeartbeat,
    AgentRegistered,
    Event,
    Inventory,
    JobAccepted,
    JobAssigned,
    JobFinished,
    JobStop,
)
from ciuic_common.logging import get_logger
from ciuic_common.proto import gpu_agent_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings
from ciuic_common.storage import S3Url
from ciuic_gpu_agent.checkout import Mirrors
from ciuic_gpu_agent.envcache import EnvCache
from ciuic_gpu_agent.inventory import GpuProbe
from ciuic_gpu_agent.runner import JobRunner, RunnerContext
from ciuic_gpu_agent.state import JobRecord, JobStateStore, finished_event, group_alive, recover

__all__ = ["GpuAgent", "GpuAgentSettings", "build", "build_agent", "default_agent_id"]

log = get_logger(__name__)

INFO = component("gpu_agent")
_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")
#: How long a stop for a job this agent does not (yet) run is kept, in case its assignment
#: is still on its way.
_EARLY_STOP_TTL = 600.0


def default_agent_id() -> str:
    """The host name, as a bus subject segment allows it (dots become dashes)."""
    return _NOT_KEY.sub("-", socket.gethostname()).strip("-") or "agent"


class GpuAgentSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port
    #: This agent's name on the bus (`ciuic.job.assigned.<agent_id>`).
    agent_id: str = Field(default_factory=default_agent_id, pattern=r"^[A-Za-z0-9_-]+$")
    #: Simulated GPUs (tests, demos): every report says so; jobs still run for real on the CPU.
    sim_gpus: int | None = Field(default=None, ge=0)
    #: Where other agents reach this one (torchrun rendezvous when it is rank 0).
    address: str = "127.0.0.1"
    heartbeat_interval: float = Field(default=2.0, gt=0)
    #: Seconds between SIGTERM and SIGKILL when a job is stopped (its last checkpoint).
    stop_grace: float = Field(default=30.0, ge=0)
    #: Mirrors, environments, job directories, state; default `<home>/agent`.
    work_dir: Path | None = None
    #: Where jobs' metrics sockets go; short, for the 107-byte limit of a socket path.
    socket_dir: Path | None = None
    log_flush_interval: float = Field(default=0.2, gt=0)
    metrics_flush_interval: float = Field(default=0.1, gt=0)
    checkpoint_interval: float = Field(default=5.0, gt=0)
    system_metrics_interval: float = Field(default=5.0, gt=0)
    #: Assignments older than this were re-placed by the scheduler long ago: not taken.
    assignment_max_age: float = Field(default=300.0, gt=0)
    #: Keep each job's directory after it ended (debugging); otherwise it is removed.
    keep_job_dirs: bool = False
    #: The interpreter that builds jobs' environments and is first on PATH without one.
    job_python: Path = Path(sys.executable)

    @property
    def agent_dir(self) -> Path:
        return (self.work_dir or self.home / "agent").absolute()

    @property
    def sockets(self) -> Path:
        return self.socket_dir or Path(tempfile.gettempdir()) / f"ciuic-agent-{os.getuid()}"


class GpuAgentApi(gpu_agent_pb2_grpc.AgentServiceServicer):
    """The gRPC API of the gpu agent (`ciuic.v1.AgentService`)."""


class GpuAgent:
    """The agent's behaviour; `build()` wires it into a Service."""

    def __init__(self, settings: GpuAgentSettings, service: Service) -> None:
        self.settings = settings
        self.service = service
        self.agent_id = settings.agent_id
        root = settings.agent_dir
        self.state = JobStateStore(root / "state")
        self.probe: GpuProbe | None = None
        self.inventory: Inventory | None = None
        self.runners: dict[str, JobRunner] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._done: OrderedDict[str, JobFinished] = OrderedDict()
        self._early_stops: dict[str, tuple[float, JobStop]] = {}
        self._shutting_down = False
        self.ctx = RunnerContext(
            agent_id=self.agent_id,
            publish=self.service.publish,
            publish_reliably=self.publish_reliably,
            storage=service.storage,
            mirrors=Mirrors(root / "mirrors"),
            envs=EnvCache(
                root / "envs", service.storage, settings.s3_bucket, python=str(settings.job_python)
            ),
            state=self.state,
            inventory=lambda: self.inventory,
            work_dir=root,
            socket_dir=settings.sockets,
            sdk_dir=root / "sdk",
            python_bin=settings.job_python.parent,
            stop_grace=settings.stop_grace,
            log_interval=settings.log_flush_interval,
            metrics_interval=settings.metrics_flush_interval,
            checkpoint_interval=settings.checkpoint_interval,
            system_metrics_interval=settings.system_metrics_interval,
            keep_job_dirs=settings.keep_job_dirs,
        )

    # -- start and stop ----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the inventory, settle the last run's jobs, register."""
        s = self.settings
        self.probe = await asyncio.to_thread(
            GpuProbe, hostname=socket.gethostname(), address=s.address, simulated_gpus=s.sim_gpus
        )
        await asyncio.to_thread(self._install_sdk)
        if self.service.storage is not None:
            try:
                await self.service.storage.ensure_bucket(s.s3_bucket)
            except CiuicError as error:
                log.warning("cache_bucket_unavailable", bucket=s.s3_bucket, error=str(error))
        leftovers = await asyncio.to_thread(self.state.load_all)
        self.inventory = await asyncio.to_thread(self._read_inventory)
        await self.publish_reliably(
            AgentRegistered(
                agent_id=self.agent_id,
                hostname=self.inventory.hostname,
                simulated=self.inventory.simulated,
                inventory=self.inventory,
                running_jobs=[],  # nothing of a previous run is followed any more
            )
        )
        log.info(
            "agent_registered",
            agent_id=self.agent_id,
            gpus=len(self.inventory.gpus),
            simulated=self.inventory.simulated,
            leftovers=len(leftovers),
        )
        for record in leftovers:
            self._spawn(self._recover(record))

    def _install_sdk(self) -> None:
        # A copy of the SDK (stdlib only) that any job interpreter can import via PYTHONPATH,
        # without exposing the agent's own packages.
        source = Path(ciuic.__file__).parent
        target = self.ctx.sdk_dir / "ciuic"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))

    async def shutdown(self) -> None:
        """Stop every job (reported lost, so the scheduler retries it) and close the probe."""
        self._shutting_down = True
        grace = min(self.settings.stop_grace, self.settings.shutdown_grace)
        runners = list(self.runners.values())
        for runner in runners:
            why = f"agent {self.agent_id} shut down"
            self._spawn(runner.stop(why, self.agent_id, lost=True, grace=grace))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace + 30.0)
        if self.probe is not None:
            await asyncio.to_thread(self.probe.close)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_reliably(self, event: Event) -> bool:
        """Publish until the bus takes it (NATS may be restarting)."""
        delay = 0.25
        while True:
            try:
                return await self.service.publish(event)
            except Exception as error:
                log.warning("publish_retry", event_name=event.name, error=repr(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- heartbeats --------------------------------------------------------------------------
    def _read_inventory(self) -> Inventory:
        assert self.probe is not None
        job_pids: dict[int, str] = {}
        gpu_jobs: dict[int, str] = {}
        for runner in list(self.runners.values()):
            for pid in runner.live_pids():
                job_pids[pid] = runner.job_id
            for gpu in runner.gpus:
                gpu_jobs[gpu] = runner.job_id
        return self.probe.inventory(job_pids, gpu_jobs)

    def running_jobs(self) -> list[str]:
        return sorted({r.job_id for r in self.runners.values() if r.finished is None})

    async def heartbeat_loop(self) -> None:
        """Every `heartbeat_interval`: the live inventory and the running jobs."""
        while True:
            started = time.monotonic()
            try:
                self.inventory = await asyncio.to_thread(self._read_inventory)
                await self.service.publish(
                    AgentHeartbeat(
                        agent_id=self.agent_id,
                        inventory=self.inventory,
                        running_jobs=self.running_jobs(),
                    )
                )
            except Exception as error:  # NATS away: the next beat tries again
                log.warning("heartbeat_failed", error=repr(error))
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.05, self.settings.heartbeat_interval - elapsed))

    # -- commands ----------------------------------------------------------------------------
    async def on_assigned(self, event: JobAssigned) -> None:
        """Record, accept at once, then run in the background."""
        if event.agent_id != self.agent_id:
            return
        key = f"{event.job_id}.a{event.attempt}.n{event.node_rank}"
        accepted = JobAccepted(
            run_id=event.run_id,
            job_id=event.job_id,
            agent_id=self.agent_id,
            attempt=event.attempt,
            node_rank=event.node_rank,
        )
        if key in self.runners or key in self._done:
            await self.service.publish(accepted)  # a redelivery: say it again, run it once
            return
        age = (datetime.now(UTC) - event.occurred_at).total_seconds()
        if age > self.settings.assignment_max_age or self._shutting_down:
            log.warning("assignment_refused", job_id=event.job_id, age_s=round(age, 1))
            return
        runner = JobRunner(event, self.ctx)
        await asyncio.to_thread(self.state.save, runner.record)
        self.runners[key] = runner
        await self.service.publish(accepted)
        log.info(
            "job_accepted",
            job_id=event.job_id,
            attempt=event.attempt,
            node_rank=event.node_rank,
            gpus=event.gpus,
        )
        self._spawn(self._run(key, runner))
        early = self._early_stops.pop(event.job_id, None)
        if early is not None and early[1].attempt in (None, event.attempt):
            self._spawn(runner.stop(early[1].reason, early[1].requested_by))

    async def _run(self, key: str, runner: JobRunner) -> None:
        try:
            finished = await runner.run()
            self._done[key] = finished
            while len(self._done) > 1000:
                self._done.popitem(last=False)
        finally:
            self.runners.pop(key, None)

    async def on_stop(self, event: JobStop) -> None:
        """Stop the job's node(s) here, or remember the stop for an assignment on its way."""
        matched = [
            r
            for r in self.runners.values()
            if r.job_id == event.job_id and event.attempt in (None, r.assigned.attempt)
        ]
        for runner in matched:
            log.info("job_stop", job_id=event.job_id, by=event.requested_by, reason=event.reason)
            self._spawn(runner.stop(event.reason, event.requested_by))
        if not matched:
            now = time.monotonic()
            self._early_stops = {
                k: v for k, v in self._early_stops.items() if now - v[0] < _EARLY_STOP_TTL
            }
            self._early_stops[event.job_id] = (now, event)

    # -- what a previous run left ------------------------------------------------------------
    async def _recover(self, record: JobRecord) -> None:
        alive = False
        for pgid in record.pgids:
            if pgid and await asyncio.to_thread(group_alive, pgid):
                alive = True
        decision = recover(record, alive)
        log.warning(
            "job_recovered", job_id=record.job_id, action=decision.action, reason=decision.reason
        )
        if decision.action == "republish":
            await self.publish_reliably(finished_event(record))
        else:
            if decision.action == "stop_and_lose":
                await self._kill_groups(record.pgids)
            artifacts = await self._upload_checkpoints(record)
            await self.publish_reliably(
                JobFinished(
                    run_id=record.run_id,
                    job_id=record.job_id,
                    agent_id=self.agent_id,
                    attempt=record.attempt,
                    node_rank=record.node_rank,
                    outcome="lost",
                    reason=decision.reason,
                    started_at=record.started(),
                    finished_at=datetime.now(UTC),
                    artifacts=artifacts,
                )
            )
        await asyncio.to_thread(self.state.remove, record)
        if record.workdir and not self.settings.keep_job_dirs:
            await asyncio.to_thread(shutil.rmtree, record.workdir, True)

    async def _kill_groups(self, pgids: list[int]) -> None:
        groups = [p for p in pgids if p]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + min(self.settings.stop_grace, 10.0)
        while time.monotonic() < deadline:
            alive = [p for p in groups if await asyncio.to_thread(group_alive, p)]
            if not alive:
                return
            await asyncio.sleep(0.1)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    async def _upload_checkpoints(self, record: JobRecord) -> list[str]:
        """The last checkpoints a lost job wrote, so its retry resumes from them."""
        storage = self.service.storage
        if storage is None or not record.output_prefix or not record.workdir:
            return []
        root = Path(record.workdir) / "out"
        base = root / "checkpoints"
        if not base.is_dir():
            return []
        prefix = S3Url.parse(record.output_prefix)
        files = await asyncio.to_thread(lambda: [p for p in base.rglob("*") if p.is_file()])
        keys = []
        for path in files:
            key = prefix.join(path.relative_to(root).as_posix()).key
            try:
                await storage.upload_file(path, prefix.bucket, key)
                keys.append(key)
            except CiuicError as error:
                log.warning("checkpoint_upload_failed", job_id=record.job_id, error=str(error))
        return keys


def build(settings: GpuAgentSettings | None = None) -> Service:
    """The gpu agent service, ready to run."""
    return build_agent(settings)[0]


def build_agent(settings: GpuAgentSettings | None = None) -> tuple[Service, GpuAgent]:
    """The gpu agent service and its behaviour (tests and benchmarks look inside)."""
    settings = settings or GpuAgentSettings()
    service = Service(
        INFO.name,
        settings,
        uses=("nats", "s3"),
        migrations=None,
    )
    service.add_grpc(
        gpu_agent_pb2_grpc.add_AgentServiceServicer_to_server, GpuAgentApi(), INFO.proto_service
    )
    agent = GpuAgent(settings, service)
    # Per-agent durables that start at what arrives from their creation on: an agent never
    # replays the stream's history, and after a restart it gets what came while it was away.
    service.bus.subscribe(
        JobAssigned,
        agent.on_assigned,
        durable=f"gpu-agent-{settings.agent_id}-assigned",
        keys={"agent_id": settings.agent_id},
        deliver_new_only=True,
    )
    service.bus.subscribe(
        JobStop, agent.on_stop, durable=f"gpu-agent-{settings.agent_id}-stop", deliver_new_only=True
    )
    service.on_start(agent.start)
    service.on_stop(agent.shutdown)
    service.background("heartbeat", agent.heartbeat_loop)
    return service, agent
