"""Simulated agents for scheduler tests: they speak the agents' side of the bus contract.

Each registers a simulated inventory, heartbeats, accepts what it is assigned, "runs" it for a
while (no process), and reports it finished with metric summaries computed from the job's
hyperparameters. A shared ledger fails the test if a GPU is ever handed out while busy.
The real agent (gpu_agent) runs jobs for real; these exist to drive the scheduler hard and fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ciuic_common.bus import Bus
from ciuic_common.events import (
    AgentHeartbeat,
    AgentRegistered,
    GpuInfo,
    Inventory,
    JobAccepted,
    JobAssigned,
    JobFinished,
    JobStarted,
    JobStop,
)

Metrics = Callable[[Mapping[str, Any]], Mapping[str, Mapping[str, float]]]
Mode = Literal["normal", "mute"]


def no_metrics(_: Mapping[str, Any]) -> Mapping[str, Mapping[str, float]]:
    return {}


@dataclass
class Ledger:
    """Who holds which GPU now, across every agent, and what went wrong."""

    busy: dict[tuple[str, int], str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    assignments: list[JobAssigned] = field(default_factory=list)
    finished: list[JobFinished] = field(default_factory=list)
    stops: list[JobStop] = field(default_factory=list)
    peak_running: int = 0
    running: set[tuple[str, int]] = field(default_factory=set)  # (job, attempt)

    def take(self, event: JobAssigned) -> None:
        self.assignments.append(event)
        for gpu in event.gpus:
            key = (event.agent_id, gpu)
            if key in self.busy:
                self.violations.append(
                    f"GPU {key} given to {event.job_id} while {self.busy[key]} holds it"
                )
            self.busy[key] = event.job_id
        self.running.add((event.job_id, event.attempt))
        self.peak_running = max(self.peak_running, len(self.running))

    def give_back(self, event: JobAssigned) -> None:
        for gpu in event.gpus:
            self.busy.pop((event.agent_id, gpu), None)
        self.running.discard((event.job_id, event.attempt))


class SimAgent:
    """One simulated agent on the bus."""

    def __init__(
        self,
        nats_url: str,
        agent_id: str,
        ledger: Ledger,
        *,
        gpus: int = 8,
        capabilities: tuple[str, ...] = ("ddp", "horovod"),
        duration: float = 0.2,
        metrics: Metrics = no_metrics,
        heartbeat: float = 0.5,
        mode: Mode = "normal",
        fails: bool = False,
    ) -> None:
        self.agent_id = agent_id
        self.ledger = ledger
        self.duration = duration
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.mode = mode
        #: Every job fails here (a broken host), whatever it runs.
        self.fails = fails
        self.inventory = Inventory(
            hostname=agent_id,
            simulated=True,
            gpus=[
                GpuInfo(
                    index=i,
                    uuid=f"GPU-{agent_id}-{i}",
                    model="Simulated GPU",
                    memory_total_mib=81920,
                )
                for i in range(gpus)
            ],
            interconnect_groups=[list(range(gpus // 2)), list(range(gpus // 2, gpus))]
            if gpus >= 2
            else [],
            millicores=64_000,
            memory_mib=512 * 1024,
            capabilities=list(capabilities),
        )
        self.bus = Bus(nats_url, name=f"sim-{agent_id}")
        self.bus.subscribe(
            JobAssigned, self._assigned, durable=f"agent-{agent_id}", keys={"agent_id": agent_id}
        )
        self.bus.subscribe(JobStop, self._stop, durable=f"agent-{agent_id}-stop")
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stops: dict[tuple[str, int], tuple[str, str]] = {}
        self._beat: asyncio.Task[None] | None = None
        self._dead = False

    async def start(self) -> None:
        await self.bus.connect()
        await self.bus.start()
        await self.bus.publish(
            AgentRegistered(
                agent_id=self.agent_id,
                hostname=self.agent_id,
                simulated=True,
                inventory=self.inventory,
            )
        )
        self._beat = asyncio.create_task(self._beats())

    async def _beats(self) -> None:
        while True:
            running = sorted({job for job, _ in self._running})
            await self.bus.publish(
                AgentHeartbeat(
                    agent_id=self.agent_id, inventory=self.inventory, running_jobs=running
                )
            )
            await asyncio.sleep(self.heartbeat)

    async def kill(self) -> None:
        """Vanish without a word: no more heartbeats, nothing reported."""
        if self._beat:
            self._beat.cancel()
        self._dead = True
        for task in self._running.values():
            task.cancel()
        await self.bus.close()

    async def _assigned(self, event: JobAssigned) -> None:
        if self.mode == "mute":
            return
        self.ledger.take(event)
        key = (event.job_id, event.attempt)
        await self.bus.publish(
            JobAccepted(
                run_id=event.run_id,
                job_id=event.job_id,
                agent_id=self.agent_id,
                attempt=event.attempt,
                node_rank=event.node_rank,
            )
        )
        await self.bus.publish(
            JobStarted(
                run_id=event.run_id,
                job_id=event.job_id,
                agent_id=self.agent_id,
                attempt=event.attempt,
                node_rank=event.node_rank,
            )
        )
        self._running[key] = asyncio.create_task(self._run(event))

    async def _run(self, event: JobAssigned) -> None:
        key = (event.job_id, event.attempt)
        steps = " && ".join(str(s.get("run", "")) for s in event.work.steps)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(self.duration)
        if self._dead:
            return
        stop = self._stops.pop(key, None)
        if stop is not None:
            outcome, exit_code, reason, by = "stopped", -15, stop[1], stop[0]
        elif "exit 1" in steps or self.fails:
            outcome, exit_code, reason, by = "failed", 1, "the step exited with 1", None
        else:
            outcome, exit_code, reason, by = "succeeded", 0, None, None
        metrics = (
            dict(self.metrics(event.work.hparams))
            if event.node_rank == 0 and outcome == "succeeded"
            else {}
        )
        self.ledger.give_back(event)
        finished = JobFinished(
            run_id=event.run_id,
            job_id=event.job_id,
            agent_id=self.agent_id,
            attempt=event.attempt,
            node_rank=event.node_rank,
            outcome=outcome,  # type: ignore[arg-type]
            exit_code=exit_code,
            reason=reason,
            stopped_by=by,
            metrics=metrics,
        )
        self.ledger.finished.append(finished)
        self._running.pop(key, None)
        await self.bus.publish(finished)

    async def _stop(self, event: JobStop) -> None:
        for (job_id, attempt), task in list(self._running.items()):
            if job_id == event.job_id and (event.attempt is None or event.attempt == attempt):
                self.ledger.stops.append(event)
                self._stops[(job_id, attempt)] = (event.requested_by, event.reason)
                task.cancel()


def loss_surface(hparams: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """A validation loss with its minimum at learning_rate 0.0005, batch_size 64 (the seed's
    grid), and NaN (a diverged run) at the largest learning rate with the smallest batch."""
    lr = float(hparams.get("learning_rate", 0.001))
    bs = float(hparams.get("batch_size", 64))
    if lr >= 0.001 and bs <= 32:
        value = math.nan
    else:
        value = (math.log10(lr) - math.log10(0.0005)) ** 2 + (math.log2(bs) - 6) ** 2 / 10 + 0.1
    return {"training_loss": {"last": value, "min": value, "max": value, "count": 100.0}}
