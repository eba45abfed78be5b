"""`ciuic runs|jobs|trials|agents` against an in-process SchedulerService with canned data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from typer.testing import CliRunner, Result

from ciuic_cli import scheduler_cmds
from ciuic_cli.console import app
from ciuic_cli.scheduler_cmds import BY
from ciuic_common.proto import common_pb2, scheduler_pb2, scheduler_pb2_grpc

pb = scheduler_pb2
REPO = "https://git.example.com/ml/deepseek-ft.git"
NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)


def ts(hh_mm_ss: str) -> Timestamp:
    at = datetime.fromisoformat(f"2025-05-01T{hh_mm_ss}+00:00")
    return Timestamp(seconds=int(at.timestamp()))


WAITING_RUN = pb.Run(
    id="3f9a1c2e5b7d",
    repository=REPO,
    ref="refs/heads/main",
    commit="a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
    pipeline="deepseek-ft",
    state="running",
    reason="stage data waits for data_versioner",
    created_at=ts("11:00:00"),
    best_trial=-1,
    pusher="ada",
    stages=[
        pb.Stage(name="setup", kind="job", state="succeeded",
                 started_at=ts("11:00:01"), finished_at=ts("11:01:06")),
        pb.Stage(name="data", kind="data", state="waiting", service="data_versioner",
                 needs=["setup"], started_at=ts("11:01:06"),
                 reason="dataset imagenet-mini@v3 is not versioned yet"),
        pb.Stage(name="training", kind="training", state="pending", needs=["data"]),
        pb.Stage(name="quick-check", kind="validation", state="pending", needs=["training"]),
        pb.Stage(name="package", kind="packaging", state="pending", needs=["quick-check"]),
        pb.Stage(name="deploy", kind="deployment", state="pending", needs=["package"]),
    ],
    jobs=[
        pb.Job(id="3f9a1c2e5b7d-setup", run_id="3f9a1c2e5b7d", stage="setup",
               kind="job", name="setup", state="succeeded", attempt=1, max_retries=2, nodes=1,
               gpus_per_node=0, started_at=ts("11:00:02"), finished_at=ts("11:01:05"),
               placement=[pb.JobNode(rank=0, agent_id="gpu-node-02", state="succeeded")]),
    ],
)  # fmt: skip

LEARNING_RATES = (0.001, 0.0003, 0.0001)
BATCH_SIZES = (16, 32, 64)
SWEEP_RUN_ID = "7c41d09e8b2a4f3e9d1c0b5a6e7f8091"


def _trial(index: int) -> pb.Trial:
    hparams = {
        "learning_rate": LEARNING_RATES[index // 3],
        "batch_size": BATCH_SIZES[index % 3],
    }
    trial = pb.Trial(
        index=index,
        job_id=f"3f9a1c2e5b7d-trial-{index}",
        hparams_json=json.dumps(hparams),
        state="succeeded",
        objective=0.30 - 0.02 * index if index < 5 else 0.25 + 0.01 * index,
        has_objective=True,
        best=index == 4,
    )
    if index == 6:
        trial.state, trial.objective, trial.reason = "failed", float("nan"), "loss became NaN"
    if index == 8:
        trial.state, trial.objective, trial.has_objective = "running", 0.0, False
    return trial


TRIALS = pb.ListTrialsResponse(
    trials=[_trial(i) for i in range(9)], objective="validation_loss (min, last)", best_trial=4
)

BEST_JOB = pb.Job(
    id="3f9a1c2e5b7d-trial-4",
    run_id=SWEEP_RUN_ID,
    stage="training",
    kind="trial",
    name="train",
    trial=4,
    state="succeeded",
    attempt=2,
    max_retries=2,
    nodes=2,
    gpus_per_node=4,
    placement=[
        pb.JobNode(rank=0, agent_id="sim-gpu-01", gpus=[0, 1, 2, 3], state="succeeded"),
        pb.JobNode(rank=1, agent_id="gpu-node-02", gpus=[4, 5, 6, 7], state="succeeded"),
    ],
    excluded_agents=["gpu-node-09"],
    queued_at=ts("11:10:00"),
    started_at=ts("11:10:30"),
    finished_at=ts("13:13:30"),
    has_exit_code=True,
    exit_code=0,
    metrics_json=json.dumps(
        {
            "validation_loss": {"last": 0.22, "min": 0.2181, "max": 1.9, "count": 120},
            "grad_norm": {"last": float("nan"), "min": 0.5, "max": 41.0, "count": 2400},
        }
    ),
    artifacts=["s3://artifacts/7c41d09e/trial-4/model.pt"],
)


def _gpu(index: int) -> pb.Gpu:
    return pb.Gpu(
        index=index,
        uuid=f"GPU-{index}c1b6f9e-2d4a-4f5e-9a7b-0c1d2e3f4a5b",
        model="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        memory_used_mib=61440 if index < 4 else 0,
        utilization_pct=62.0 if index < 4 else 0.0,
        temperature_c=64.0 if index < 4 else 31.0,
        power_w=512.0 if index < 4 else 70.0,
        job_id=BEST_JOB.id if index < 4 else "",
        busy_foreign=index == 7,
    )


SIM_AGENT = pb.Agent(
    id="sim-gpu-01",
    hostname="ci-runner-3",
    state="alive",
    simulated=True,
    gpus=[_gpu(i) for i in range(8)],
    capabilities=["cuda12", "nccl"],
    millicores=64000,
    memory_mib=524288,
    registered_at=ts("09:00:00"),
    last_seen_at=ts("11:59:57"),
    jobs=[BEST_JOB.id],
    cpu_pct=23.0,
    address="10.0.0.13:50053",
)
REAL_AGENT = pb.Agent(
    id="gpu-node-02", hostname="gpu-node-02.lab", state="alive", millicores=32000,
    memory_mib=262144, last_seen_at=ts("11:59:59"), address="10.0.0.2:50053",
)  # fmt: skip
LOST_AGENT = pb.Agent(id="gpu-node-09", hostname="gpu-node-09.lab", state="lost")


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Canned answers; every request is recorded for the tests to look at."""

    PAGE_CAP = 2  # like a real server, it returns fewer than asked for and a token

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.runs = [
            WAITING_RUN,
            *(
                pb.Run(id=f"{i:02d}{SWEEP_RUN_ID[2:]}", repository=REPO, state="succeeded")
                for i in range(4)
            ),
        ]
        self.watched: list[pb.Run] = []

    def received(self, method: str) -> list[Any]:
        return [request for name, request in self.requests if name == method]

    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListRuns", request))
        start = int(request.page.page_token or 0)
        end = start + min(request.page.page_size or 50, self.PAGE_CAP)
        token = str(end) if end < len(self.runs) else ""
        return pb.ListRunsResponse(
            runs=self.runs[start:end], page=common_pb2.PageResponse(next_page_token=token)
        )

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("GetRun", request))
        if self.watched:
            return self.watched.pop(0)
        if WAITING_RUN.id.startswith(request.run_id):
            return WAITING_RUN
        context.abort(grpc.StatusCode.NOT_FOUND, f"no run has an id starting {request.run_id!r}")
        raise AssertionError("abort returns no answer")

    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("CancelRun", request))
        run = pb.Run()
        run.CopyFrom(WAITING_RUN)
        run.state = "cancelled"
        run.finished_at.CopyFrom(ts("11:30:00"))
        return run

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListJobs", request))
        return pb.ListJobsResponse(jobs=[BEST_JOB, *WAITING_RUN.jobs])

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("GetJob", request))
        return BEST_JOB

    def StopJob(self, request: pb.StopJobRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("StopJob", request))
        job = pb.Job()
        job.CopyFrom(BEST_JOB)
        job.state = "running"
        job.ClearField("finished_at")
        return job

    def ListTrials(self, request: pb.ListTrialsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListTrials", request))
        return TRIALS

    def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListAgents", request))
        agents = [SIM_AGENT, REAL_AGENT] + ([LOST_AGENT] if request.include_lost else [])
        return pb.ListAgentsResponse(agents=agents)

    def GetAgent(self, request: pb.GetAgentRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("GetAgent", request))
        return SIM_AGENT


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeScheduler]:
    fake = FakeScheduler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("CIUIC_SCHEDULER_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("LOGNAME", "ada")  # what getpass.getuser() reads first
    monkeypatch.setattr(scheduler_cmds, "_now", lambda: NOW)
    yield fake
    server.stop(grace=None)


Ciuic = Callable[..., Result]


@pytest.fixture
def ciuic(scheduler: FakeScheduler) -> Ciuic:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args))

    return invoke


def _row(output: str, first_cell: str) -> str:
    """The table line whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) > 2 and cells[1] == first_cell:
            return line
    raise AssertionError(f"no row starts with {first_cell!r} in:\n{output}")


def test_run_show_says_what_a_waiting_stage_waits_for(ciuic: Ciuic) -> None:
    done = ciuic("runs", "show", "3f9a")

    assert done.exit_code == 0, done.output
    assert "run 3f9a1c2e5b7d  running" in done.stdout
    assert f"{REPO}@refs/heads/main a1b2c3d4e5" in done.stdout
    assert "waiting for data_versioner" in _row(done.stdout, "data")
    assert "58m 54s" in _row(done.stdout, "data")  # still waiting: counts up to now
    assert "1m 05s" in _row(done.stdout, "setup")
    assert "best trial" not in done.stdout
    jobs = done.stdout.rsplit("jobs", 1)[1]  # the jobs table, after the stages table
    assert "1/3" in _row(jobs, "setup")  # attempt 1 of max_retries + 1
    assert "gpu-node-02" in _row(jobs, "setup")


def test_run_show_asks_for_the_prefix_it_was_given(ciuic: Ciuic, scheduler: FakeScheduler) -> None:
    ciuic("runs", "show", "3f9a")

    assert [r.run_id for r in scheduler.received("GetRun")] == ["3f9a"]


def test_an_unknown_run_exits_1_with_one_error_line(ciuic: Ciuic) -> None:
    done = ciuic("runs", "show", "nope")

    assert done.exit_code == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["error: scheduler: no run has an id starting 'nope'"]


def test_run_show_json_is_the_whole_run(ciuic: Ciuic) -> None:
    done = ciuic("runs", "show", "3f9a", "--json")

    assert done.exit_code == 0, done.output
    run = json.loads(done.stdout)
    assert run["id"] == WAITING_RUN.id
    assert run["stages"][1]["service"] == "data_versioner"
    assert run["best_trial"] == -1
    assert run["jobs"][0]["gpus_per_node"] == 0  # defaults are printed, not dropped


def test_watch_follows_the_run_until_it_ends(
    ciuic: Ciuic, scheduler: FakeScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_cmds, "WATCH_SECONDS", 0.01)
    ended = pb.Run()
    ended.CopyFrom(WAITING_RUN)
    ended.state, ended.reason, ended.best_trial = "succeeded", "", 4
    ended.finished_at.CopyFrom(ts("11:45:00"))
    scheduler.watched = [WAITING_RUN, WAITING_RUN, ended]

    done = ciuic("runs", "show", "3f9a", "--watch")

    assert done.exit_code == 0, done.output
    assert [r.run_id for r in scheduler.received("GetRun")] == ["3f9a"] + [WAITING_RUN.id] * 2
    assert done.stdout.count("run 3f9a1c2e5b7d") == 1  # the final view only
    assert "run 3f9a1c2e5b7d  succeeded" in done.stdout
    assert "45m 00s" in done.stdout  # created 11:00, finished 11:45
    assert "best trial  4" in done.stdout


def test_watch_with_json_prints_only_the_run_it_ended_as(
    ciuic: Ciuic, scheduler: FakeScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_cmds, "WATCH_SECONDS", 0.01)
    ended = pb.Run()
    ended.CopyFrom(WAITING_RUN)
    ended.state = "failed"
    scheduler.watched = [WAITING_RUN, ended]

    done = ciuic("runs", "show", "3f9a", "--watch", "--json")

    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["state"] == "failed"


def test_stopping_a_watch_shows_the_last_view_and_says_the_run_goes_on(
    ciuic: Ciuic, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scheduler_cmds, "time", SimpleNamespace(sleep=interrupt))

    done = ciuic("runs", "show", "3f9a", "--watch")

    assert done.exit_code == 1
    assert "waiting for data_versioner" in done.stdout
    assert "stopped watching before the run ended" in done.stderr
    assert "ciuic runs cancel 3f9a1c2e" in done.stderr


def test_runs_ls_follows_page_tokens_up_to_the_limit(
    ciuic: Ciuic, scheduler: FakeScheduler
) -> None:
    done = ciuic("runs", "ls", "--limit", "3", "--repository", REPO, "--state", "running")

    assert done.exit_code == 0, done.output
    requests = scheduler.received("ListRuns")
    assert [(r.page.page_size, r.page.page_token) for r in requests] == [(3, ""), (1, "2")]
    assert {(r.repository, r.state) for r in requests} == {(REPO, "running")}
    row = _row(done.stdout, "3f9a1c2e")
    for cell in ("main", "a1b2c3d4e5", "running", "1/6", "2025-05-01 11:00:00", "1h 00m"):
        assert cell in row
    assert _row(done.stdout, "0141d09e")
    assert "0241d09e" not in done.stdout


def test_runs_ls_json_has_full_ids_and_where_to_go_on(ciuic: Ciuic) -> None:
    done = ciuic("runs", "ls", "--limit", "2", "--json")

    listed = json.loads(done.stdout)
    assert [r["id"] for r in listed["runs"]] == [WAITING_RUN.id, f"00{SWEEP_RUN_ID[2:]}"]
    assert listed["page"]["next_page_token"] == "2"


def test_a_limit_below_one_is_a_usage_error(ciuic: Ciuic) -> None:
    assert ciuic("runs", "ls", "--limit", "0").exit_code == 2


def test_cancel_says_who_asked_and_why(ciuic: Ciuic, scheduler: FakeScheduler) -> None:
    done = ciuic("runs", "cancel", "3f9a", "--reason", "wrong dataset")

    assert done.exit_code == 0, done.output
    (request,) = scheduler.received("CancelRun")
    assert (request.run_id, request.reason) == ("3f9a", "wrong dataset")
    assert request.requested_by == "ada"
    assert f"run {WAITING_RUN.id} is cancelled" in done.stdout


def test_stop_says_who_asked_and_why_and_that_it_is_still_stopping(
    ciuic: Ciuic, scheduler: FakeScheduler
) -> None:
    done = ciuic("jobs", "stop", BEST_JOB.id, "--reason", "diverging")

    assert done.exit_code == 0, done.output
    (request,) = scheduler.received("StopJob")
    assert (request.job_id, request.reason, request.requested_by) == (
        BEST_JOB.id, "diverging", "ada",
    )  # fmt: skip
    assert f"job {BEST_JOB.id} is running" in done.stdout
    assert "its agents are stopping it" in done.stdout


def test_jobs_ls_passes_its_filters_and_shows_shape_and_agents(
    ciuic: Ciuic, scheduler: FakeScheduler
) -> None:
    done = ciuic("jobs", "ls", "--run", "7c41", "--state", "succeeded", "--agent", "sim-gpu-01")

    assert done.exit_code == 0, done.output
    (request,) = scheduler.received("ListJobs")
    assert (request.run_id, request.state, request.agent_id) == ("7c41", "succeeded", "sim-gpu-01")
    assert request.page.page_size == 20
    row = _row(done.stdout, "trial-4")
    for cell in ("7c41d09e", "training", "trial", "succeeded", "2/3", f"2{BY}4", "2h 03m"):
        assert cell in row


def test_job_show_lists_placement_and_a_metrics_summary(ciuic: Ciuic) -> None:
    done = ciuic("jobs", "show", BEST_JOB.id)

    assert done.exit_code == 0, done.output
    assert "0, 1, 2, 3" in _row(done.stdout, "0")
    assert "gpu-node-02" in _row(done.stdout, "1")
    loss = _row(done.stdout, "validation_loss")
    assert [c.strip() for c in loss.split("│")[2:6]] == ["0.22", "0.2181", "1.9", "120"]
    assert "nan" in _row(done.stdout, "grad_norm")
    assert "exit code" in done.stdout
    assert "gpu-node-09" in done.stdout  # excluded


def test_trials_mark_the_best_trial_on_its_own_row(ciuic: Ciuic) -> None:
    done = ciuic("trials", SWEEP_RUN_ID[:8])

    assert done.exit_code == 0, done.output
    header = _row(done.stdout, "trial")
    assert header.index("learning_rate") < header.index("batch_size") < header.index("objective")
    best = [line for line in done.stdout.splitlines() if "★ best" in line]
    assert best == [_row(done.stdout, "4")]
    assert "0.0003" in best[0]
    assert "0.22" in best[0]
    assert "objective: validation_loss (min, last)" in done.stdout


def test_trials_show_nan_and_a_missing_objective_apart(ciuic: Ciuic) -> None:
    done = ciuic("trials", SWEEP_RUN_ID[:8])

    nan_row = _row(done.stdout, "6")
    assert "nan" in nan_row
    assert "loss became NaN" in nan_row
    assert "—" in _row(done.stdout, "8")
    assert "nan" not in _row(done.stdout, "8")


def test_trials_json_keeps_best_and_objectives(ciuic: Ciuic) -> None:
    done = ciuic("trials", SWEEP_RUN_ID[:8], "--json")

    listed = json.loads(done.stdout)
    assert listed["best_trial"] == 4
    assert [t["index"] for t in listed["trials"] if t["best"]] == [4]
    assert listed["trials"][6]["objective"] == "NaN"
    assert listed["trials"][8]["has_objective"] is False
    assert json.loads(listed["trials"][4]["hparams_json"]) == {
        "learning_rate": 0.0003,
        "batch_size": 32,
    }


def test_agents_ls_marks_simulated_agents_and_counts_busy_gpus(
    ciuic: Ciuic, scheduler: FakeScheduler
) -> None:
    done = ciuic("agents", "ls")

    assert done.exit_code == 0, done.output
    assert scheduler.received("ListAgents")[0].include_lost is False
    sim = _row(done.stdout, "sim-gpu-01 simulated")
    for cell in ("ci-runner-3", "alive", "8", "4", "31%", "64 cores", "512.0 GiB", "3s ago"):
        assert cell in sim
    assert "simulated" not in _row(done.stdout, "gpu-node-02")
    assert "gpu-node-09" not in done.stdout


def test_agents_ls_all_includes_lost_agents(ciuic: Ciuic, scheduler: FakeScheduler) -> None:
    done = ciuic("agents", "ls", "--all")

    assert scheduler.received("ListAgents")[0].include_lost is True
    assert "lost" in _row(done.stdout, "gpu-node-09")


def test_agent_show_draws_each_gpu_and_flags_foreign_processes(ciuic: Ciuic) -> None:
    done = ciuic("agents", "show", "sim-gpu-01")

    assert done.exit_code == 0, done.output
    assert "GPUs of sim-gpu-01 (simulated inventory)" in done.stdout
    busy = _row(done.stdout, "0")
    for cell in ("H100", "GPU-0c1b6f9", "███░░  62%", "60.0 / 79.6 GiB", "64 °C", "512 W"):
        assert cell in busy
    assert "3f9a1c2e" in busy
    assert "foreign process" in _row(done.stdout, "7")
    assert "foreign process" not in _row(done.stdout, "6")


def test_agent_json_has_sizes_as_numbers(ciuic: Ciuic) -> None:
    done = ciuic("agents", "show", "sim-gpu-01", "--json")

    agent = json.loads(done.stdout)
    assert agent["simulated"] is True
    assert agent["gpus"][0]["memory_total_mib"] == 81559
    assert len(agent["gpus"]) == 8


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.85, "850 ms"), (42.0, "42s"), (65.0, "1m 05s"), (7380.0, "2h 03m"), (273600.0, "3d 04h")],
)
def test_durations_read_in_the_largest_two_units(seconds: float, shown: str) -> None:
    assert scheduler_cmds._duration(seconds) == shown
