"""The event registry: every message ciuic puts on the bus, declared once.

An event is a pydantic model whose class names its subject and its JetStream stream. The subject
may carry key segments (`ciuic.job.assigned.{agent_id}`) filled from the event's own fields.
`event_id` travels as `Nats-Msg-Id`, so JetStream drops a second publish of the same event.

Events say what happened and go to whoever listens; commands (`job.assigned.<agent>`,
`job.stop.<job_id>`) ask one service to act. Both are declared here. `python -m
ciuic_common.events` prints the registry as Markdown (`docs/events.md`).
"""

from __future__ import annotations

import re
import string
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEAD_LETTER_PREFIX",
    "EVENTS",
    "STREAMS",
    "Event",
    "StreamSpec",
    "event_for_subject",
    "registry_markdown",
]

DAY = 24 * 3600.0
GIB = 1024**3


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream: its subjects and retention. Created idempotently at start."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_age: float = 30 * DAY  # seconds; 0 keeps forever
    max_bytes: int = -1
    #: How long JetStream remembers a Nats-Msg-Id to drop a duplicate publish.
    duplicate_window: float = 600.0

    def covers(self, subject: str) -> bool:
        """True when `subject` (possibly with `*` tokens) falls under one of our subjects."""
        return any(_matches(pattern, subject) for pattern in self.subjects)


def _matches(pattern: str, subject: str) -> bool:
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


DEAD_LETTER_PREFIX = "ciuic.deadletter"

STREAMS: dict[str, StreamSpec] = {
    s.name: s
    for s in (
        StreamSpec("PIPELINES", ("ciuic.pipeline.>", "ciuic.run.>"), "pipeline runs"),
        StreamSpec("JOBS", ("ciuic.job.>", "ciuic.agent.>"), "jobs, trials and agents"),
        StreamSpec("DATA", ("ciuic.data.>",), "dataset versions and lineage"),
        StreamSpec("MODELS", ("ciuic.model.>",), "the model registry"),
        StreamSpec("DEPLOY", ("ciuic.deploy.>", "ciuic.experiment.>"), "rollouts, experiments"),
        StreamSpec("ALERTS", ("ciuic.alert.>",), "alert state changes"),
        StreamSpec(
            "METRICS",
            ("ciuic.metrics.>",),
            "batches of metric points (bounded window)",
            max_age=7 * DAY,
            max_bytes=4 * GIB,
            duplicate_window=120.0,
        ),
        StreamSpec(
            "LOGS",
            ("ciuic.logs.>",),
            "batches of job log lines (bounded window)",
            max_age=7 * DAY,
            max_bytes=2 * GIB,
            duplicate_window=120.0,
        ),
        StreamSpec(
            "DEADLETTER",
            (f"{DEAD_LETTER_PREFIX}.>",),
            "messages a consumer gave up on, with the reason in headers",
        ),
    )
}

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

#: Every event class by its name (`job.finished`).
EVENTS: dict[str, type[Event]] = {}


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class Event(BaseModel):
    """The base of every bus message."""

    # NaN and ±inf are legitimate metric values: keep them on the wire (JSON `NaN`).
    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="constants")

    #: Subject template; `{field}` segments are filled from the event (the key segments).
    subject: ClassVar[str]
    #: The stream that stores it, or None for plain NATS (heartbeats: not stored).
    stream: ClassVar[StreamSpec | None]
    #: `event` says what happened; `command` asks one service to act.
    kind: ClassVar[Literal["event", "command"]] = "event"
    #: Short name used in docs, logs and the registry (`job.finished`).
    name: ClassVar[str]

    event_id: str = Field(default_factory=_new_id, description="unique; sent as Nats-Msg-Id")
    occurred_at: datetime = Field(default_factory=_now)
    schema_version: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "subject" not in cls.__dict__:
            return  # an abstract intermediate class
        cls.name = ".".join(t for t in cls.subject.split(".")[1:] if not t.startswith("{"))
        if cls.name in EVENTS:
            raise TypeError(f"event {cls.name!r} is declared twice")
        stream = cls.__dict__.get("stream")
        if stream is not None and not stream.covers(cls.wildcard_subject()):
            raise TypeError(f"{cls.__name__}: {cls.subject} is not in stream {stream.name}")
        EVENTS[cls.name] = cls

    @classmethod
    def key_fields(cls) -> tuple[str, ...]:
        """The field names that fill the subject's key segments, in order."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(cls.subject) if f)

    @classmethod
    def wildcard_subject(cls, **keys: str) -> str:
        """The subject with given keys filled and the others as `*` (for subscriptions)."""
        return cls.subject.format(**{k: keys.get(k, "*") for k in cls.key_fields()})

    def subject_for(self) -> str:
        """The concrete subject of this event."""
        values = {}
        for key in self.key_fields():
            value = str(getattr(self, key))
            if not _KEY.match(value):
                raise ValueError(
                    f"{self.name}: {key}={value!r} cannot be a subject segment "
                    "(letters, digits, '-' and '_' only)"
                )
            values[key] = value
        return self.subject.format(**values)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)


def event_for_subject(subject: str) -> type[Event] | None:
    """The event class whose subject template matches a concrete subject."""
    for cls in EVENTS.values():
        if _matches(cls.wildcard_subject(), subject):
            return cls
    return None


# ---------------------------------------------------------------------------------------------
# Pipelines: trigger -> scheduler
# ---------------------------------------------------------------------------------------------
class SpecIssue(BaseModel):
    """One problem in a pipeline file, located for a person to fix."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="field path, e.g. training.hyperparameters[1].values")
    line: int | None = None
    column: int | None = None
    message: str


class PipelineRequested(Event):
    """A push (or a person) asked for a pipeline run, and its file validated."""

    subject = "ciuic.pipeline.requested"
    stream = STREAMS["PIPELINES"]

    repository: str
    commit: str
    ref: str
    spec: dict[str, Any] = Field(description="the validated pipeline file, resolved")
    changed_files: list[str] = Field(default_factory=list)
    pusher: str | None = None
    delivery_id: str | None = Field(default=None, description="the webhook delivery, if any")


class PipelineRejected(Event):
    """A push matched a registered repository but its pipeline file is invalid."""

    subject = "ciuic.pipeline.rejected"
    stream = STREAMS["PIPELINES"]

    repository: str
    commit: str
    ref: str
    delivery_id: str | None = None
    errors: list[SpecIssue]


class RunCreated(Event):
    """The scheduler created a run and its DAG."""

    subject = "ciuic.run.created"
    stream = STREAMS["PIPELINES"]

    run_id: str
    repository: str
    commit: str
    ref: str
    pipeline: str | None = Field(default=None, description="the pipeline's name, if it has one")
    stages: list[str] = Field(default_factory=list, description="stage names in order")
    trials: int = Field(default=0, description="trials of the training sweep")


StageState = Literal["pending", "waiting", "queued", "running", "succeeded", "failed", "cancelled"]


class RunStageChanged(Event):
    """A stage of a run changed state. A stage that another service carries out (data,
    packaging, deployment) is `waiting` with `service` named: that service acts on this event."""

    subject = "ciuic.run.stage.changed"
    stream = STREAMS["PIPELINES"]

    run_id: str
    stage: str
    stage_kind: Literal["job", "data", "training", "validation", "packaging", "deployment"]
    state: StageState
    service: str | None = Field(default=None, description="the service the stage waits for")
    reason: str | None = None
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="what the service needs (datasets, the best model)"
    )
    outputs: dict[str, Any] = Field(
        default_factory=dict,
        description="what an ended stage produced: the best trial and its objective, gate results",
    )


class BaselineResolved(Event):
    """The metrics collector's answer to a validation stage waiting for it: the baseline the
    stage's gates compare with (the best earlier run of the same pipeline and branch)."""

    subject = "ciuic.run.baseline.resolved"
    stream = STREAMS["PIPELINES"]

    run_id: str
    stage: str
    #: None when no earlier run logged these metrics: gates on the baseline then pass, saying so.
    baseline_run_id: str | None = None
    baseline: dict[str, float] = Field(default_factory=dict)
    reason: str = Field(description="how the baseline was chosen, in words")


class RunFinished(Event):
    """A run ended."""

    subject = "ciuic.run.finished"
    stream = STREAMS["PIPELINES"]

    run_id: str
    outcome: Literal["succeeded", "failed", "cancelled"]
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Jobs and agents: scheduler <-> gpu_agent
# ---------------------------------------------------------------------------------------------
class GpuProcess(BaseModel):
    """A process NVML shows on a GPU; `job_id` is set when the agent started it."""

    model_config = ConfigDict(frozen=True)

    pid: int
    used_memory_mib: int = 0
    job_id: str | None = None


class GpuInfo(BaseModel):
    """One GPU as NVML reports it (live fields are refreshed by every heartbeat)."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    index: int
    uuid: str = ""
    model: str = ""
    memory_total_mib: int = 0
    memory_used_mib: int = 0
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: list[GpuProcess] = Field(default_factory=list)

    @property
    def busy_foreign(self) -> bool:
        """Processes we did not start hold this GPU: it is not offered to jobs."""
        return any(p.job_id is None for p in self.processes)


class Inventory(BaseModel):
    """What an agent's host has and offers. Simulated inventories say so."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    hostname: str = ""
    #: Where other agents reach this one (torchrun rendezvous of multi-node jobs).
    address: str = "127.0.0.1"
    simulated: bool = False
    gpus: list[GpuInfo] = Field(default_factory=list)
    #: Why the agent offers no GPU (no NVML library, no device): it offers CPU slots instead.
    gpu_note: str | None = None
    #: GPU indices linked by a fast interconnect (NVLink), as NVML reports topology.
    interconnect_groups: list[list[int]] = Field(default_factory=list)
    #: CPU (millicores) and memory the agent offers jobs; CPU slots when it has no GPU.
    millicores: int = 0
    memory_mib: int = 0
    capabilities: list[str] = Field(default_factory=list, description="ddp, horovod, ...")
    python_versions: list[str] = Field(default_factory=list)
    cpu_pct: float | None = None
    memory_used_mib: int | None = None


class AgentRegistered(Event):
    """An agent came up and described its host."""

    subject = "ciuic.agent.registered"
    stream = STREAMS["JOBS"]

    agent_id: str
    hostname: str
    simulated: bool = False
    inventory: Inventory = Field(default_factory=Inventory)
    #: Jobs it was running when it (re)started, as `job_id` (it reports each as finished/lost).
    running_jobs: list[str] = Field(default_factory=list)


class AgentHeartbeat(Event):
    """An agent is alive; live utilisation of its GPUs. Plain NATS, not stored."""

    subject = "ciuic.heartbeat.agent.{agent_id}"
    stream = None

    agent_id: str
    inventory: Inventory = Field(default_factory=Inventory)
    running_jobs: list[str] = Field(default_factory=list)


class AgentLost(Event):
    """The scheduler heard nothing from an agent for too long; its jobs were requeued."""

    subject = "ciuic.agent.lost"
    stream = STREAMS["JOBS"]

    agent_id: str
    silent_for_s: float
    jobs: list[str] = Field(default_factory=list)


class JobWork(BaseModel):
    """What an agent runs for one node of a job: the code, the steps, the environment."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["job", "trial", "validation"]
    #: The job's name in the pipeline (`setup`, `training`, `quick-check`).
    name: str
    repository: str
    commit: str
    ref: str = ""
    #: Steps as the pipeline file gives them (`run:` and `cache:` entries), in order.
    steps: list[dict[str, Any]] = Field(default_factory=list)
    container: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    hparams: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = None
    strategy: Literal["ddp", "horovod", "none"] = "none"
    nodes: int = 1
    gpus_per_node: int = 0
    #: Rank 0's host and a port for torchrun's rendezvous (multi-node jobs).
    rendezvous: str | None = None
    #: Where the job's outputs go: `s3://<bucket>/runs/<run_id>/<job_id>/`.
    output_prefix: str | None = None
    #: A checkpoint to start from (a retry's own last one, or the best trial's for validation).
    init_checkpoint: str | None = None
    #: Dataset name -> version id, resolved by the data stage.
    datasets: dict[str, str] = Field(default_factory=dict)


class JobAssigned(Event):
    """Command: run node `node_rank` of this job on this agent (attempt `attempt`)."""

    subject = "ciuic.job.assigned.{agent_id}"
    stream = STREAMS["JOBS"]
    kind = "command"

    agent_id: str
    run_id: str
    job_id: str
    attempt: int = 1
    node_rank: int = 0
    gpus: list[int] = Field(default_factory=list)
    work: JobWork


class JobAccepted(Event):
    """An agent acknowledged an assignment; without it in time the job is placed elsewhere."""

    subject = "ciuic.job.accepted"
    stream = STREAMS["JOBS"]

    run_id: str
    job_id: str
    agent_id: str
    attempt: int = 1
    node_rank: int = 0


class JobStarted(Event):
    """An agent started a job's process."""

    subject = "ciuic.job.started"
    stream = STREAMS["JOBS"]

    run_id: str
    job_id: str
    agent_id: str
    attempt: int = 1
    node_rank: int = 0


JobOutcome = Literal["succeeded", "failed", "stopped", "timed_out", "lost"]


class JobFinished(Event):
    """A node of a job ended, with its outcome and a summary of every metric it logged
    (`last`, `min`, `max`, `count`, and `avg_last_k`, the mean of the last k points)."""

    subject = "ciuic.job.finished"
    stream = STREAMS["JOBS"]

    run_id: str
    job_id: str
    agent_id: str
    attempt: int = 1
    node_rank: int = 0
    outcome: JobOutcome
    exit_code: int | None = None
    reason: str | None = None
    stopped_by: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifacts: list[str] = Field(default_factory=list)
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)


class JobChanged(Event):
    """The scheduler moved a job (queued, assigned, running, retried, ended, cancelled)."""

    subject = "ciuic.job.changed"
    stream = STREAMS["JOBS"]

    run_id: str
    job_id: str
    stage: str
    state: str
    attempt: int = 1
    agents: list[str] = Field(default_factory=list)
    reason: str | None = None


class JobStop(Event):
    """Command: stop this job (SIGTERM, grace, SIGKILL), saying who asked and why."""

    subject = "ciuic.job.stop.{job_id}"
    stream = STREAMS["JOBS"]
    kind = "command"

    job_id: str
    requested_by: str
    reason: str
    #: Only this attempt (an assignment that was re-placed); None stops whatever runs.
    attempt: int | None = None


# ---------------------------------------------------------------------------------------------
# Streams of points and lines: gpu_agent -> metrics_collector, alerter, CLI
# ---------------------------------------------------------------------------------------------
class MetricPoint(BaseModel):
    """One point as an object; batches carry points as columns (`MetricsBatch`)."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    key: str
    step: int
    value: float
    timestamp: datetime


#: The latest time a point may carry, in Unix seconds: the end of year 9999 (a datetime's range).
MAX_UNIX_TIME = 253_402_300_799.0

UnixTime = Annotated[float, Field(ge=0, le=MAX_UNIX_TIME)]


@dataclass(slots=True)
class MetricColumns:
    """Points as parallel lists, the shape `MetricsBatch` carries them in: point i is
    (keys[i], steps[i], values[i], times[i]), times in Unix seconds. Built without an object
    per point, by whoever collects points for a batch."""

    keys: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, key: str, step: int, value: float, time: float) -> None:
        """Add one point at the end."""
        self.keys.append(key)
        self.steps.append(step)
        self.values.append(value)
        self.times.append(time)


class MetricsBatch(Event):
    """Metric points of one job, batched by its agent, as parallel columns: point i is
    (`keys[i]`, `steps[i]`, `values[i]`, `times[i]`), its time in Unix seconds, NaN and
    infinities kept (JSON `NaN`, `Infinity`). `points` gives them as `MetricPoint` objects."""

    subject = "ciuic.metrics.{run_id}"
    stream = STREAMS["METRICS"]

    run_id: str
    job_id: str
    source: Literal["training", "system"] = "training"
    keys: list[str] = Field(description="the metric key of each point")
    steps: list[int]
    values: list[float]
    times: list[UnixTime] = Field(description="Unix seconds")
    #: 2: points as columns (1 sent a list of point objects).
    schema_version: int = 2

    @model_validator(mode="after")
    def _columns_have_one_length(self) -> Self:
        n = len(self.keys)
        if not len(self.steps) == len(self.values) == len(self.times) == n:
            raise ValueError(
                "MetricsBatch columns must have one length: "
                f"keys {n}, steps {len(self.steps)}, values {len(self.values)}, "
                f"times {len(self.times)}"
            )
        return self

    @classmethod
    def of(cls, *, points: Iterable[MetricPoint], **fields: Any) -> Self:
        """A batch of these points (`run_id`, `job_id`, ... as keywords); naive times are UTC."""
        columns = MetricColumns()
        for p in points:
            at = p.timestamp if p.timestamp.tzinfo else p.timestamp.replace(tzinfo=UTC)
            columns.append(p.key, p.step, p.value, at.timestamp())
        return cls.from_columns(columns, **fields)

    @classmethod
    def from_columns(cls, columns: MetricColumns, **fields: Any) -> Self:
        """A batch of the points in `columns` (`run_id`, `job_id`, ... as keywords)."""
        return cls(
            keys=columns.keys,
            steps=columns.steps,
            values=columns.values,
            times=columns.times,
            **fields,
        )

    @cached_property
    def points(self) -> list[MetricPoint]:
        """The points as objects, built on first use (the wire and the collector use columns)."""
        return [
            MetricPoint(key=k, step=s, value=v, timestamp=datetime.fromtimestamp(t, UTC))
            for k, s, v, t in zip(self.keys, self.steps, self.values, self.times, strict=True)
        ]


class LogLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    timestamp: datetime
    stream: Literal["stdout", "stderr"]
    text: str


class LogsBatch(Event):
    """Log lines of one job on one node, batched by its agent."""

    subject = "ciuic.logs.{run_id}"
    stream = STREAMS["LOGS"]

    run_id: str
    job_id: str
    node: str
    lines: list[LogLine]


# ---------------------------------------------------------------------------------------------
# Data, models, alerts, deployments
# ---------------------------------------------------------------------------------------------
class DataVersionReady(Event):
    """A dataset version was resolved or built for a run."""

    subject = "ciuic.data.version.ready"
    stream = STREAMS["DATA"]

    dataset: str
    version_id: str
    run_id: str | None = None


class ModelRegistered(Event):
    """The packager registered a model version with its artifacts."""

    subject = "ciuic.model.registered"
    stream = STREAMS["MODELS"]

    model: str
    version: str
    run_id: str | None = None
    formats: list[str] = Field(default_factory=list)
    location: str


class AlertChanged(Event):
    """An alert became pending, firing or resolved."""

    subject = "ciuic.alert.changed"
    stream = STREAMS["ALERTS"]

    rule: str
    run_id: str
    job_id: str | None = None
    state: Literal["pending", "firing", "resolved"]
    value: float | None = None
    message: str


class RolloutChanged(Event):
    """A deployment's rollout moved (a canary step, a promotion, a rollback)."""

    subject = "ciuic.deploy.rollout.changed"
    stream = STREAMS["DEPLOY"]

    deployment: str
    strategy: Literal["blue-green", "canary", "shadow", "ab"]
    state: str
    weights: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
def registry_markdown() -> str:
    """The registry as Markdown: streams, then every event with its subject, stream and fields."""
    out = [
        "# Events",
        "",
        "Generated from `ciuic_common.events` by `make docs`; do not edit by hand.",
        "",
        "Every event carries `event_id` (sent as `Nats-Msg-Id`; JetStream drops a duplicate",
        "publish inside the stream's duplicate window), `occurred_at` and `schema_version`.",
        "Delivery is at-least-once; every handler is idempotent. A message a consumer cannot",
        f"handle after its bounded redeliveries goes to `{DEAD_LETTER_PREFIX}.<subject>` with",
        "`Ciuic-Error`, `Ciuic-Consumer` and `Ciuic-Deliveries` headers.",
        "",
        "## Streams",
        "",
        "| stream | subjects | max age | max bytes | duplicate window | holds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in STREAMS.values():
        age = f"{s.max_age / DAY:g} d" if s.max_age else "forever"
        size = f"{s.max_bytes / GIB:g} GiB" if s.max_bytes > 0 else "unbounded"
        subjects = ", ".join(f"`{x}`" for x in s.subjects)
        out.append(
            f"| {s.name} | {subjects} | {age} | {size} | {s.duplicate_window:g} s | "
            f"{s.description} |"
        )
    out += [
        "",
        "## Events and commands",
        "",
        "| name | kind | subject | stream | fields |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = set(Event.model_fields)
    for name, cls in sorted(EVENTS.items()):
        fields = ", ".join(f"`{f}`" for f in cls.model_fields if f not in base)
        stream = cls.stream.name if cls.stream else "none (plain NATS)"
        out.append(f"| `{name}` | {cls.kind} | `{cls.subject}` | {stream} | {fields} |")
    out.append("")
    for name, cls in sorted(EVENTS.items()):
        out += [f"### `{name}`", "", (cls.__doc__ or "").strip(), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(registry_markdown())
