"""The scheduler against real NATS and PostgreSQL, with simulated agents speaking the agents'
side of the bus: runs as DAGs, sweeps, placement, failures, cancel, and the gRPC API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ciuic_common.bus import Bus
from ciuic_common.events import (
    BaselineResolved,
    DataVersionReady,
    PipelineRequested,
    RunStageChanged,
)
from ciuic_common.pipeline import load_pipeline
from ciuic_common.proto import scheduler_pb2, scheduler_pb2_grpc
from ciuic_common.rpc import channel
from ciuic_common.servers import free_port
from ciuic_common.service import Service
from ciuic_scheduler.service import LEADER_BUCKET, SchedulerSettings, build
from tests.integration.simagents import Ledger, SimAgent, loss_surface

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "examples" / "seed" / ".ciuicci.yaml").read_text()


def fast(nats_url: str, database_url: str, **overrides: Any) -> SchedulerSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "database_url": database_url,
        "grpc_port": 0,
        "metrics_port": 0,
        "ack_timeout": 3.0,
        "agent_lost_after": 2.0,
        "stop_grace": 1.0,
        "tick_interval": 0.1,
        "leader_ttl": 1.5,
    }
    return SchedulerSettings(**(values | overrides))


@contextlib.asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def api(service: Service) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    async with channel(f"127.0.0.1:{service.grpc_port}") as ch:
        yield scheduler_pb2_grpc.SchedulerServiceStub(ch)


@contextlib.asynccontextmanager
async def agents(
    nats_url: str, ledger: Ledger, count: int, **kw: Any
) -> AsyncIterator[list[SimAgent]]:
    sims = [SimAgent(nats_url, f"sim-{i}", ledger, **kw) for i in range(count)]
    for sim in sims:
        await sim.start()
    try:
        yield sims
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.kill()


async def request(nats_url: str, text: str, event_id: str | None = None) -> PipelineRequested:
    event = PipelineRequested(
        repository="example.com/ml/deepseek",
        commit="a" * 40,
        ref="refs/heads/main",
        spec=load_pipeline(text).model_dump(mode="json"),
        **({"event_id": event_id} if event_id else {}),
    )
    bus = Bus(nats_url, name="test-trigger")
    await bus.connect()
    try:
        await bus.publish(event)
    finally:
        await bus.close()
    return event


async def eventually(
    probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], within: float, what: str
) -> Any:
    deadline = time.monotonic() + within
    value = None
    while time.monotonic() < deadline:
        try:
            value = await probe()
        except grpc.aio.AioRpcError as exc:  # a server still starting
            value = exc
        else:
            if check(value):
                return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last seen: {value}")


async def the_run(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> scheduler_pb2.Run | None:
    runs = await stub.ListRuns(scheduler_pb2.ListRunsRequest())
    if not runs.runs:
        return None
    return await stub.GetRun(scheduler_pb2.GetRunRequest(run_id=runs.runs[0].id))


def stages(run: scheduler_pb2.Run | None) -> dict[str, str]:
    return {s.name: s.state for s in run.stages} if run else {}


async def test_the_seed_sweep_runs_one_trial_at_a_time_on_4x8_gpus_and_picks_the_best(
    nats_url: str, database_url: str
) -> None:
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, ledger, 4, duration=0.15, metrics=loss_surface),
    ):
        await request(nats_url, SEED)
        run = await eventually(
            lambda: the_run(stub),
            lambda r: stages(r).get("packaging") == "waiting",
            90,
            "the seed to reach packaging",
        )
        trials = await stub.ListTrials(scheduler_pb2.ListTrialsRequest(run_id=run.id))

    assert not ledger.violations
    assert stages(run) == {
        "setup": "succeeded",
        "training": "succeeded",
        "quick-check": "succeeded",
        "thorough-eval": "succeeded",
        "packaging": "waiting",
        "deployment": "pending",
    }
    packaging = next(s for s in run.stages if s.name == "packaging")
    assert packaging.service == "packager"
    assert packaging.reason == "waiting for packager"
    assert run.state == "running", "a stage waiting for a service never passes silently"

    # 9 trials, each a gang of 4 nodes x 8 GPUs on the four agents, one at a time.
    trial_assignments = [a for a in ledger.assignments if a.work.kind == "trial"]
    assert len({a.job_id for a in trial_assignments}) == 9
    for job_id in {a.job_id for a in trial_assignments}:
        nodes = [a for a in trial_assignments if a.job_id == job_id]
        assert sorted(a.agent_id for a in nodes) == ["sim-0", "sim-1", "sim-2", "sim-3"]
        assert all(len(a.gpus) == 8 for a in nodes)
        assert sorted(a.node_rank for a in nodes) == [0, 1, 2, 3]
        assert len({a.work.rendezvous for a in nodes}) == 1
    assert ledger.peak_running == 1, "each trial takes the whole cluster"

    best = [t for t in trials.trials if t.best]
    assert [(t.index, t.hparams_json) for t in best] == [
        (4, '{"learning_rate": 0.0005, "batch_size": 64}')
    ]
    assert trials.best_trial == 4
    assert run.best_trial == 4
    nan_trial = trials.trials[0]  # learning_rate 0.001, batch_size 32: diverged
    assert nan_trial.state == "succeeded"
    assert not nan_trial.has_objective
    assert not nan_trial.best
    assert trials.objective == "training_loss (min, last)"

    validations = [a for a in ledger.assignments if a.work.kind == "validation"]
    assert [a.work.name for a in validations] == ["quick-check", "thorough-eval"]
    for a in validations:
        assert a.work.hparams == {"learning_rate": 0.0005, "batch_size": 64}
        assert a.work.init_checkpoint == f"s3://ciuic/runs/{run.id}/{run.id}-trial-4/checkpoints/"


async def test_trials_respect_max_concurrent_trials_and_a_redelivered_request_creates_one_run(
    nats_url: str, database_url: str
) -> None:
    spec = """
training:
  gpus_per_node: 1
  max_concurrent_trials: 2
  hyperparameters:
    - {name: learning_rate, min: 0.0001, max: 0.1, distribution: log_uniform}
  trials: 6
  seed: 3
"""
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, ledger, 1, duration=0.3, metrics=loss_surface),
    ):
        event = await request(nats_url, spec)
        await request(nats_url, spec, event_id=event.event_id)  # JetStream drops it
        await request(nats_url, spec, event_id=event.event_id + "-again")
        await eventually(
            lambda: stub.ListRuns(scheduler_pb2.ListRunsRequest()),
            lambda r: len(r.runs) == 2 and all(x.state == "succeeded" for x in r.runs),
            60,
            "both runs to succeed",
        )
        runs = await stub.ListRuns(scheduler_pb2.ListRunsRequest())
        first, second = [
            await stub.ListTrials(scheduler_pb2.ListTrialsRequest(run_id=r.id)) for r in runs.runs
        ]
    assert [t.hparams_json for t in first.trials] == [t.hparams_json for t in second.trials]
    assert len(first.trials) == 6
    assert ledger.peak_running <= 4, "two runs, at most two trials each at once"
    assert not ledger.violations


async def test_a_failed_job_fails_its_dependents_with_the_cause(
    nats_url: str, database_url: str
) -> None:
    spec = """
jobs:
  build: {steps: [{run: make}]}
  test: {needs: build, steps: [{run: exit 1}]}
training:
  command: python train.py
"""
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    async with running(service), api(service) as stub, agents(nats_url, ledger, 1):
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub),
            lambda r: r is not None and r.state == "failed",
            30,
            "the failure",
        )
    by_name = {s.name: s for s in run.stages}
    assert by_name["build"].state == "succeeded"
    assert by_name["test"].state == "failed"
    assert "exit 1" in by_name["test"].reason
    assert by_name["training"].state == "failed"
    assert by_name["training"].reason.startswith("needs test, which failed")
    assert run.reason.startswith("test: ")
    assert not [a for a in ledger.assignments if a.work.kind == "trial"]


async def test_a_shape_no_agent_could_ever_hold_is_rejected_at_submission(
    nats_url: str, database_url: str
) -> None:
    spec = "training:\n  nodes: 2\n  gpus_per_node: 16\n"
    service = build(fast(nats_url, database_url))
    async with running(service), api(service) as stub, agents(nats_url, Ledger(), 4):
        await eventually(
            lambda: stub.ListAgents(scheduler_pb2.ListAgentsRequest()),
            lambda r: len(r.agents) == 4,
            20,
            "agents to register",
        )
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "failed", 20, "rejection"
        )
    (job,) = run.jobs
    assert job.state == "failed"
    assert job.reason.startswith("no registered agent could ever run it")
    assert "16" in job.reason


async def test_a_lost_agent_s_job_is_retried_elsewhere_from_its_checkpoint(
    nats_url: str, database_url: str
) -> None:
    spec = "training:\n  gpus_per_node: 8\n  max_retries: 1\n"
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, ledger, 2, duration=3.0) as sims,
    ):
        await request(nats_url, spec)
        await eventually(lambda: asyncio.sleep(0, ledger.assignments), bool, 20, "assignment")
        victim = next(s for s in sims if s.agent_id == ledger.assignments[0].agent_id)
        await victim.kill()
        run = await eventually(
            lambda: the_run(stub),
            lambda r: r is not None and r.state == "succeeded",
            40,
            "the retry to succeed",
        )
        listed = await stub.ListAgents(scheduler_pb2.ListAgentsRequest(include_lost=True))
    (job,) = run.jobs
    assert job.attempt == 2
    assert list(job.excluded_agents) == [victim.agent_id]
    first, second = ledger.assignments
    assert second.agent_id != victim.agent_id
    assert second.work.init_checkpoint == f"{first.work.output_prefix}checkpoints/"
    assert {a.id: a.state for a in listed.agents}[victim.agent_id] == "lost"


async def test_an_assignment_not_accepted_in_time_is_placed_on_another_agent(
    nats_url: str, database_url: str
) -> None:
    spec = "training:\n  gpus_per_node: 8\n"
    ledger = Ledger()
    service = build(fast(nats_url, database_url, ack_timeout=1.0))
    # Equal agents: placement breaks the tie by id, so the mute one is chosen first.
    mute = SimAgent(nats_url, "a-mute", ledger, mode="mute")
    await mute.start()
    try:
        async with running(service), api(service) as stub, agents(nats_url, ledger, 1):
            await eventually(
                lambda: stub.ListAgents(scheduler_pb2.ListAgentsRequest()),
                lambda r: len(r.agents) == 2,
                20,
                "both agents",
            )
            await request(nats_url, spec)
            run = await eventually(
                lambda: the_run(stub),
                lambda r: r is not None and r.state == "succeeded",
                30,
                "the job to run elsewhere",
            )
    finally:
        await mute.kill()
    (job,) = run.jobs
    assert list(job.excluded_agents) == ["a-mute"]
    assert job.attempt == 2
    assert [a.agent_id for a in ledger.assignments] == ["sim-0"]


async def test_cancel_stops_running_jobs_and_cancels_queued_ones(
    nats_url: str, database_url: str
) -> None:
    spec = """
training:
  gpus_per_node: 8
  hyperparameters: [{name: learning_rate, values: [0.1, 0.01, 0.001]}]
"""
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    async with running(service), api(service) as stub, agents(nats_url, ledger, 1, duration=30.0):
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub),
            lambda r: r is not None and any(j.state == "running" for j in r.jobs),
            20,
            "a trial to run",
        )
        cancelled = await stub.CancelRun(
            scheduler_pb2.CancelRunRequest(
                run_id=run.id[:6], requested_by="ada", reason="wrong data"
            )
        )
        assert cancelled.id == run.id
        run = await eventually(
            lambda: the_run(stub),
            lambda r: r is not None and all(j.state == "cancelled" for j in r.jobs),
            20,
            "every job to be cancelled",
        )
    assert run.state == "cancelled"
    assert run.reason == "cancelled by ada: wrong data"
    assert {s.state for s in run.stages} == {"cancelled"}
    (stop,) = ledger.stops
    assert (stop.requested_by, stop.reason) == ("ada", "cancelled by ada: wrong data")
    assert len(ledger.assignments) == 1, "queued trials never started"


async def test_a_stage_whose_service_does_not_exist_waits_for_it_visibly(
    nats_url: str, database_url: str
) -> None:
    spec = "data:\n  corpus: s3://datasets/corpus/\ntraining:\n  command: python train.py\n"
    changes: list[RunStageChanged] = []
    listener = Bus(nats_url, name="test-listener")

    async def seen(event: RunStageChanged) -> None:
        changes.append(event)

    listener.subscribe(RunStageChanged, seen, durable="test-stage-changes")
    service = build(fast(nats_url, database_url))
    async with running(service), api(service) as stub, agents(nats_url, Ledger(), 1):
        await listener.connect()
        await listener.start()
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub), lambda r: stages(r).get("data") == "waiting", 20, "data"
        )
        data = next(s for s in run.stages if s.name == "data")
        assert (data.service, data.reason) == ("data_versioner", "waiting for data_versioner")
        await asyncio.sleep(1.0)
        assert stages(await the_run(stub))["training"] == "pending"
        # The data versioner (issue 8) answers with the version; the run goes on.
        await listener.publish(DataVersionReady(dataset="corpus", version_id="v1", run_id=run.id))
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "succeeded", 20, "run"
        )
        await asyncio.sleep(0.5)
    await listener.close()
    waiting = next(c for c in changes if c.stage == "data" and c.state == "waiting")
    assert waiting.service == "data_versioner"
    assert waiting.inputs["datasets"]["corpus"]["source"] == "s3://datasets/corpus/"
    trial = next(j for j in run.jobs if j.kind == "trial")
    assert trial.state == "succeeded"


async def test_validation_gates_pass_or_fail_the_stage_with_the_numbers(
    nats_url: str, database_url: str
) -> None:
    spec = """
training:
  command: python train.py
validation:
  stages:
    - {name: quick, dataset: small, timeout: 5m, gates: ["training_loss < 0.5"]}
    - {name: strict, dataset: full, timeout: 5m, gates: ["training_loss < 0.05"]}
"""

    def metrics(_: Any) -> dict[str, dict[str, float]]:
        return {"training_loss": {"last": 0.1, "min": 0.1, "max": 0.1, "count": 1.0}}

    service = build(fast(nats_url, database_url))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, Ledger(), 1, metrics=metrics),
    ):
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "failed", 30, "gates"
        )
    by_name = {s.name: s for s in run.stages}
    assert by_name["quick"].state == "succeeded"
    assert "training_loss=0.1" in by_name["quick"].reason
    assert by_name["strict"].state == "failed"
    assert by_name["strict"].reason == "training_loss < 0.05 (training_loss=0.1): FAIL"


async def test_killing_the_active_scheduler_hands_over_to_the_standby_without_losing_a_job(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    spec = """
training:
  gpus_per_node: 8
  hyperparameters: [{name: learning_rate, values: [0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]}]
"""
    env = {
        **os.environ,
        "CIUIC_NATS_URL": nats_url,
        "CIUIC_DATABASE_URL": database_url,
        "CIUIC_LOG_FORMAT": "json",
        "CIUIC_LEADER_TTL": "2",
        "CIUIC_TICK_INTERVAL": "0.1",
        "CIUIC_HOME": str(tmp_path),
    }
    script = str(Path(sys.executable).parent / "ciuic-scheduler")
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

    def start(name: str) -> None:
        port = free_port()
        with (tmp_path / f"{name}.log").open("wb") as out:
            procs[name] = (
                subprocess.Popen(
                    [script],
                    env={
                        **env,
                        "CIUIC_REPLICA_ID": name,
                        "CIUIC_GRPC_PORT": str(port),
                        "CIUIC_METRICS_PORT": str(free_port()),
                    },
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ),
                port,
            )

    async def leader() -> str | None:
        bus = Bus(nats_url, name="test-leader-probe")
        await bus.connect()
        try:
            kv = await bus.js.key_value(LEADER_BUCKET)
            return (await kv.get("leader")).value.decode()  # type: ignore[union-attr]
        except Exception:
            return None
        finally:
            await bus.close()

    ledger = Ledger()
    try:
        start("replica-a")
        assert await eventually(leader, lambda v: v == "replica-a", 30, "replica-a to lead")
        start("replica-b")
        async with (
            agents(nats_url, ledger, 2, duration=1.5, metrics=loss_surface),
            channel(f"127.0.0.1:{procs['replica-b'][1]}") as ch,
        ):
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            await eventually(
                lambda: stub.ListAgents(scheduler_pb2.ListAgentsRequest()),
                lambda r: len(r.agents) == 2,
                30,
                "the standby to see both agents",
            )
            await request(nats_url, spec)
            await eventually(
                lambda: asyncio.sleep(0, len(ledger.finished)), lambda n: n >= 2, 30, "2 trials"
            )
            killed_at = time.monotonic()
            procs["replica-a"][0].send_signal(signal.SIGKILL)
            await eventually(leader, lambda v: v == "replica-b", 30, "replica-b to take over")
            print(f"standby leads {time.monotonic() - killed_at:.1f}s after the kill")
            run = await eventually(
                lambda: the_run(stub),
                lambda r: r is not None and r.state == "succeeded",
                60,
                "the run to finish under the standby",
            )
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    assert not ledger.violations
    trials = [j for j in run.jobs if j.kind == "trial"]
    assert len(trials) == 6
    assert all(j.state == "succeeded" for j in trials)
    placed = [(a.job_id, a.attempt) for a in ledger.assignments]
    assert len(placed) == len(set(placed)) == 6, "each trial placed exactly once"
    done = sorted(f.job_id for f in ledger.finished)
    assert done == sorted({j.id for j in trials}), "each trial ran to its end exactly once"


async def test_a_job_past_its_timeout_is_stopped_and_ends_timed_out(
    nats_url: str, database_url: str
) -> None:
    spec = "training:\n  gpus_per_node: 1\n  timeout: 1s\n"
    ledger = Ledger()
    service = build(fast(nats_url, database_url, ack_timeout=1.0))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, ledger, 1, duration=60.0),
    ):
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "failed", 30, "timeout"
        )
    (job,) = run.jobs
    assert (job.state, job.reason) == ("timed_out", "timed out after 1s")
    (stop,) = ledger.stops
    assert (stop.requested_by, stop.reason) == ("scheduler", "timed out after 1s")


async def test_a_gate_against_history_waits_for_the_baseline_and_fails_on_the_wrong_side(
    nats_url: str, database_url: str
) -> None:
    spec = """
training:
  command: python train.py
validation:
  stages:
    - {name: vs-history, dataset: full, timeout: 5m, gates: ["training_loss <= baseline + 0.05"]}
"""

    def metrics(_: Any) -> dict[str, dict[str, float]]:
        return {"training_loss": {"last": 0.1, "min": 0.1, "max": 0.1, "count": 1.0}}

    seen: list[RunStageChanged] = []
    collector = Bus(nats_url, name="test-metrics-collector")

    async def waiting(event: RunStageChanged) -> None:
        if event.state == "waiting" and event.service == "metrics_collector":
            seen.append(event)

    collector.subscribe(RunStageChanged, waiting, durable="test-baseline-requests")
    service = build(fast(nats_url, database_url))
    async with (
        running(service),
        api(service) as stub,
        agents(nats_url, Ledger(), 1, metrics=metrics),
    ):
        await collector.connect()
        await collector.start()
        await request(nats_url, spec)
        await eventually(lambda: asyncio.sleep(0, seen), bool, 30, "the request for a baseline")
        (asked,) = seen
        assert asked.inputs["metrics"] == ["training_loss"]
        assert asked.inputs["ref"] == "refs/heads/main"
        await collector.publish(
            BaselineResolved(
                run_id=asked.run_id,
                stage=asked.stage,
                baseline_run_id="earlier",
                baseline={"training_loss": 0.02},
                reason="best earlier run on training_loss",
            )
        )
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "failed", 30, "the gate"
        )
    await collector.close()
    stage = next(s for s in run.stages if s.name == "vs-history")
    assert stage.state == "failed"
    assert stage.reason == (
        "training_loss <= baseline + 0.05 (training_loss=0.1, baseline=0.02): FAIL"
    )


async def test_a_pipeline_the_scheduler_cannot_run_becomes_a_failed_run_that_says_why(
    nats_url: str, database_url: str
) -> None:
    spec = """
training:
  search: bayesian
  trials: 4
  hyperparameters: [{name: learning_rate, min: 0.0001, max: 0.1}]
"""
    service = build(fast(nats_url, database_url))
    async with running(service), api(service) as stub:
        await request(nats_url, spec)
        run = await eventually(
            lambda: the_run(stub), lambda r: r is not None and r.state == "failed", 20, "the run"
        )
    assert "bayesian search is not available yet" in run.reason
    assert not run.stages


async def test_a_gang_whose_node_fails_is_failed_and_retried_not_just_stopped(
    nats_url: str, database_url: str
) -> None:
    spec = "training:\n  nodes: 2\n  gpus_per_node: 8\n  max_retries: 1\n"
    ledger = Ledger()
    service = build(fast(nats_url, database_url))
    good = SimAgent(nats_url, "sim-good", ledger, duration=2.0)
    bad = SimAgent(nats_url, "sim-bad", ledger, duration=0.1, fails=True)
    await good.start()
    await bad.start()
    try:
        async with running(service), api(service) as stub:
            await request(nats_url, spec)
            run = await eventually(
                lambda: the_run(stub),
                lambda r: r is not None and r.state == "failed",
                30,
                "the run to fail after its retry",
            )
    finally:
        await good.kill()
        await bad.kill()
    (job,) = run.jobs
    assert (job.state, job.attempt) == ("failed", 2)
    assert "on sim-bad (exit 1)" in job.reason
    # The healthy node was stopped each time, the failing one was not asked.
    assert {(s.attempt, s.requested_by) for s in ledger.stops} == {
        (1, "scheduler"),
        (2, "scheduler"),
    }
