"""Where and when jobs run: gang placement of GPU jobs with priorities, fair share and backfill.

Pure: no I/O, no clocks (`now` is an argument), no randomness; the same state and queue always
give the same decisions.

One scheduling pass (`schedule`) walks the queue in order and places every job that fits now:
- order: priority (higher first), then the project furthest below its fair share (usage per
  weight; see `fairshare`), then submission time. A placement charges its project at once with
  the usage it is expected to add, so one pass already interleaves projects by weight.
- gang: a job gets all `nodes` at once or none, each node on a different agent, each with
  `gpus_per_node` GPUs and the job's CPU and memory.
- the first job that does not fit (the head) gets a reservation: the earliest time, from the
  running jobs' expected ends, at which agents can hold all its nodes, and which GPUs. Later jobs
  are backfilled (EASY backfill) only if they cannot delay it: they end before the reservation
  starts by their runtime estimate, or use only what the reservation leaves spare. A job without
  an estimate never counts as ending in time. A head that could not start even if every running
  job ended (agents lost, GPUs held by foreign processes) is reported as stalled and does not
  block the jobs behind it.
- GPU choice (`schedule`): among agents that can host a node, prefer the placement that leaves
  the fewest GPUs unusable for the sizes still queued (GPUs, CPU and memory together), then best
  fit (the fewest free GPUs left on the agent), then the agent whose running jobs are expected
  to end no earlier than this one (else the least delay to its last expected end), then GPUs
  within as few interconnect (NVLink) groups as the agent's topology allows, then agent id. On
  the chosen agent the GPUs come from as few groups as possible, the fullest group that holds
  them first. Fragmentation is also a matter of time: a job that outlives its agent's other
  jobs keeps that agent from being whole again, for the 8-GPU jobs and gangs, after they end;
  jobs that end alike, placed together, free whole agents together. (Best fit goes before the
  group preference across agents: the other way round spreads jobs over emptier agents to stay
  in one group and strands more GPUs than plain best fit; see bench/placement.py.) `best_fit`
  and `first_fit` are the textbook baselines with the same queue order and backfill.

`ClusterState` and `JobQueue` are in-memory indexes the scheduler changes as jobs start, end and
agents come and go; a pass only reads them (and works on a private copy of what it changes).
They keep agents bucketed by free-GPU count, sorted by the CPU and the memory free beside their
GPUs, and, per GPU count, by when that many GPUs will be free, so a decision or a reservation
looks at a handful of agents rather than the whole cluster; a decision skips agents alike one it
has ranked, and a pass drops from its scans the agents none of whose free GPUs a queued job
could use. Jobs that differ only in CPU and memory form a group; a pass works out which requests
of a group cannot fit (asking more of both cannot fit either: a pass only takes resources),
skips the jobs they cover, and stops when they cover every group, so it does not walk a long
queue of jobs that cannot start. The queue keeps what a pass reads of its groups until a job
changes it.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeAlias, TypeVar

from ciuic_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ciuic_scheduler.fairshare import FairShare, Usage

__all__ = [
    "DEFAULT_BACKFILL_DEPTH",
    "Agent",
    "Allocation",
    "ClusterState",
    "Decisions",
    "Gpu",
    "JobQueue",
    "JobRequest",
    "NodeAssignment",
    "Placement",
    "Policy",
    "Reservation",
    "Stalled",
    "best_fit",
    "feasible",
    "first_fit",
    "schedule",
    "stranded_gpus",
]

#: Queued jobs a pass examines behind the head for backfill (as Slurm's bf_max_job_test): it
#: bounds a pass on a long queue of jobs that cannot start now.
DEFAULT_BACKFILL_DEPTH = 1000

#: How many candidates a pass weighs one by one: a decision ranks at most this many agents when
#: none is ideal (leaves no hole, spans no extra group), and ranks every agent that has the CPU
#: or the memory a job asks when there are no more than this; a pass lists the jobs short
#: enough to backfill onto a reservation's holds when there are no more than this.
_SEARCH_BREADTH = 64

#: How many more agents a decision looks at, once it has candidates that make nothing unusable
#: and leave as few GPUs as any agent still to come, for one whose jobs end as late as the new one
#: (fewer looks miss such agents more often; more cost time on a large idle cluster).
_TIE_BREADTH = 8

_NEVER = math.inf  # the end of a job of unknown length

_MEMO_LIMIT = 100_000  # answers a demand remembers before it starts afresh

_Number = TypeVar("_Number", int, float)


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU of an agent as NVML reports it."""

    index: int
    uuid: str = ""
    model: str = ""
    memory_total_mib: int = 0
    memory_used_mib: int = 0
    #: NVML shows processes on it that ciuic did not start: it is never offered to a job.
    busy_foreign: bool = False


@dataclass(frozen=True, slots=True)
class Agent:
    """A host that runs jobs: its GPUs and what it offers ciuic jobs in CPU and memory."""

    agent_id: str
    gpus: tuple[Gpu, ...] = ()
    #: CPU and memory the agent offers jobs in total (not what is free: allocations say that).
    millicores: int = 0
    memory_mib: int = 0
    #: Training strategies it can run, such as "ddp" and "horovod".
    capabilities: frozenset[str] = frozenset()
    #: GPU indices linked by a fast interconnect, e.g. ((0, 1, 2, 3), (4, 5, 6, 7)); empty when
    #: the agent reports no topology.
    interconnect_groups: tuple[tuple[int, ...], ...] = ()
    simulated: bool = False

    def __post_init__(self) -> None:
        indices = [gpu.index for gpu in self.gpus]
        if len(set(indices)) != len(indices):
            raise InvalidArgument(f"agent {self.agent_id} reports a GPU index twice: {indices}")
        grouped = [index for group in self.interconnect_groups for index in group]
        if len(set(grouped)) != len(grouped) or not set(grouped) <= set(indices):
            raise InvalidArgument(
                f"agent {self.agent_id}: interconnect groups {self.interconnect_groups} must be "
                f"disjoint sets of its GPU indices {indices}"
            )
        if self.millicores < 0 or self.memory_mib < 0:
            raise InvalidArgument(f"agent {self.agent_id}: CPU and memory cannot be negative")


class _Group(NamedTuple):
    """Jobs that may differ only in the CPU and memory they ask per node."""

    nodes: int
    gpus_per_node: int
    capability: str | None
    excluded_agents: frozenset[str]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A job asking to run: `nodes` times `gpus_per_node` GPUs, with CPU and memory per node."""

    job_id: str
    project: str
    nodes: int = 1
    gpus_per_node: int = 1
    millicores_per_node: int = 0
    memory_mib_per_node: int = 0
    #: Higher runs first.
    priority: int = 0
    #: A capability every node's agent must have (the training strategy), or None.
    capability: str | None = None
    submitted_at: float = 0.0
    #: Declared or learned runtime in seconds; None when unknown.
    runtime_estimate_s: float | None = None
    #: Agents this job failed on before; it never goes back to them.
    excluded_agents: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.job_id:
            raise InvalidArgument("a job needs an id")
        if self.nodes < 1:
            raise InvalidArgument(f"job {self.job_id}: nodes must be at least 1, not {self.nodes}")
        if min(self.gpus_per_node, self.millicores_per_node, self.memory_mib_per_node) < 0:
            raise InvalidArgument(f"job {self.job_id}: GPUs, CPU and memory cannot be negative")
        estimate = self.runtime_estimate_s
        if estimate is not None and not (estimate > 0 and math.isfinite(estimate)):
            raise InvalidArgument(
                f"job {self.job_id}: runtime estimate must be > 0, not {estimate}"
            )
        if not math.isfinite(self.submitted_at):
            raise InvalidArgument(f"job {self.job_id}: submitted_at must be a finite time")

    @property
    def gpus(self) -> int:
        """GPUs over all nodes."""
        return self.nodes * self.gpus_per_node

    @property
    def _group(self) -> _Group:
        return _Group(self.nodes, self.gpus_per_node, self.capability, self.excluded_agents)


@dataclass(frozen=True, slots=True)
class NodeAssignment:
    """One node of a job: an agent and the indices of its GPUs the node gets."""

    agent_id: str
    gpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Allocation:
    """A running job: where its nodes are and when it is expected to end (None: unknown)."""

    job_id: str
    project: str
    nodes: tuple[NodeAssignment, ...]
    millicores_per_node: int = 0
    memory_mib_per_node: int = 0
    started_at: float = 0.0
    ends_at: float | None = None

    @property
    def gpus(self) -> int:
        """GPUs over all nodes."""
        return sum(len(node.gpus) for node in self.nodes)


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision to start `job` now on `nodes`; `backfilled` when it jumped a reserved job."""

    job: JobRequest
    nodes: tuple[NodeAssignment, ...]
    backfilled: bool = False

    @property
    def job_id(self) -> str:
        return self.job.job_id


@dataclass(frozen=True, slots=True)
class Reservation:
    """Where the head job will start, and when (None: once jobs of unknown length end)."""

    job_id: str
    starts_at: float | None
    nodes: tuple[NodeAssignment, ...]


@dataclass(frozen=True, slots=True)
class Stalled:
    """A job that could not start even if every running job ended, and why."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decisions:
    """What one scheduling pass decided, in the order it decided it."""

    placements: tuple[Placement, ...] = ()
    reservation: Reservation | None = None
    #: The jobs found stalled this pass; one per group of like jobs, not every stalled job.
    stalled: tuple[Stalled, ...] = ()


# --- feasibility --------------------------------------------------------------------------------


def feasible(request: JobRequest, agents: Iterable[Agent]) -> str | None:
    """Why no set of these agents could ever run `request`, or None if some set could."""
    return _shortfall(request, list(agents), lambda agent: len(agent.gpus), "GPUs")


def _shortfall(
    job: JobRequest, agents: list[Agent], gpus_of: Callable[[Agent], int], gpus_word: str
) -> str | None:
    if not agents:
        return "no agents are registered"
    capable = [a for a in agents if job.capability is None or job.capability in a.capabilities]
    if not capable:
        return f"needs the {job.capability!r} capability, which no registered agent has"
    among = "" if job.capability is None else f" with {job.capability!r}"
    most_gpus = max(gpus_of(agent) for agent in capable)
    if most_gpus < job.gpus_per_node:
        return (
            f"needs {job.gpus_per_node} {gpus_word} on one node; the largest agent{among} "
            f"has {most_gpus}"
        )
    most_cpu = max(agent.millicores for agent in capable)
    if most_cpu < job.millicores_per_node:
        return (
            f"needs {_cpus(job.millicores_per_node)} on one node; the largest agent{among} "
            f"offers {_cpus(most_cpu)}"
        )
    most_memory = max(agent.memory_mib for agent in capable)
    if most_memory < job.memory_mib_per_node:
        return (
            f"needs {_memory(job.memory_mib_per_node)} of memory on one node; the largest "
            f"agent{among} offers {_memory(most_memory)}"
        )
    hosts = [
        agent
        for agent in capable
        if gpus_of(agent) >= job.gpus_per_node
        and agent.millicores >= job.millicores_per_node
        and agent.memory_mib >= job.memory_mib_per_node
    ]
    allowed = [agent for agent in hosts if agent.agent_id not in job.excluded_agents]
    if len(allowed) >= job.nodes:
        return None
    reason = f"needs {job.nodes} agents that each offer {_node(job, gpus_word)}{among}; "
    reason += f"{len(allowed)} can"
    if excluded := len(hosts) - len(allowed):
        reason += f" ({excluded} more excluded because this job failed on them)"
    return reason


def _node(job: JobRequest, gpus_word: str) -> str:
    """What one node of `job` asks, in words."""
    parts = [f"{job.gpus_per_node} {gpus_word}"]
    if job.millicores_per_node:
        parts.append(_cpus(job.millicores_per_node))
    if job.memory_mib_per_node:
        parts.append(f"{_memory(job.memory_mib_per_node)} of memory")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _cpus(millicores: int) -> str:
    cores = millicores / 1000
    return f"{cores:g} CPU" + ("" if cores == 1 else "s")


def _memory(mib: int) -> str:
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"


# --- the cluster --------------------------------------------------------------------------------


class _Free(NamedTuple):
    """What an agent has free now."""

    gpus: frozenset[int]
    millicores: int
    memory_mib: int


class _Release(NamedTuple):
    """What a running node gives back to its agent, and when it is expected to."""

    ends_at: float  # _NEVER when unknown
    job_id: str
    gpus: tuple[int, ...]
    millicores: int
    memory_mib: int


class ClusterState:
    """The agents, what each has free, the running allocations and each project's usage.

    The scheduler keeps one in memory and changes it through these methods once the decisions
    that change it are committed; `schedule` reads it and never changes it.
    """

    def __init__(
        self,
        agents: Iterable[Agent] = (),
        allocations: Iterable[Allocation] = (),
        *,
        fair_share: FairShare | None = None,
        usage: Mapping[str, float] | None = None,
        usage_as_of: float = 0.0,
    ) -> None:
        """`usage`: each project's decayed GPU-seconds at `usage_as_of`, running jobs included."""
        self.fair_share = fair_share or FairShare()
        self._agents: dict[str, Agent] = {}
        self._usable: dict[str, frozenset[int]] = {}  # GPU indices not held by foreign processes
        self._topology: dict[str, _Topology | None] = {}
        self._free: dict[str, _Free] = {}
        self._releases: dict[str, tuple[_Release, ...]] = {}  # sorted by (ends_at, job_id)
        self._by_free: dict[int, list[str]] = {}  # free-GPU count -> sorted agent ids
        # GPU count g -> sorted (time at which the agent will have g GPUs free, agent id)
        self._ready: dict[int, list[tuple[float, str]]] = {}
        self._ready_of: dict[str, tuple[float, ...]] = {}
        # Agents with a GPU free, by the CPU and by the memory free beside it: finds the few
        # agents that can host a request without wading through those stranded without either.
        self._by_cpu: list[tuple[int, str]] = []
        self._by_memory: list[tuple[int, str]] = []
        self._allocations: dict[str, Allocation] = {}
        self._usage = {
            project: Usage(used, 0, usage_as_of) for project, used in (usage or {}).items()
        }
        self._sizes: Counter[int] = Counter()  # usable GPUs per agent -> agents
        self._usable_gpus = 0
        self._allocated_gpus = 0
        for agent in agents:
            self.register(agent)
        running = sorted(allocations, key=lambda a: (a.started_at, a.job_id))
        self._check_fits(running)
        with self._reindexing(running):
            for allocation in running:
                gpus = self._occupy(allocation)
                # Running jobs accrue usage from when they started, or from the snapshot.
                self._settle(allocation.project, max(allocation.started_at, usage_as_of), gpus)

    # reading

    @property
    def agents(self) -> Mapping[str, Agent]:
        return MappingProxyType(self._agents)

    @property
    def allocations(self) -> Mapping[str, Allocation]:
        return MappingProxyType(self._allocations)

    @property
    def usable_gpus(self) -> int:
        """GPUs of all agents that are not held by foreign processes."""
        return self._usable_gpus

    @property
    def allocated_gpus(self) -> int:
        return self._allocated_gpus

    def free_gpus(self, agent_id: str) -> frozenset[int]:
        """The GPU indices of `agent_id` a job could get now."""
        return self._free[agent_id].gpus

    def jobs_on(self, agent_id: str) -> tuple[str, ...]:
        """The running jobs with a node on `agent_id`."""
        return tuple(sorted({release.job_id for release in self._releases.get(agent_id, ())}))

    def usage(self, now: float) -> dict[str, float]:
        """Each project's decayed GPU-seconds at `now`."""
        return {project: used.at(now, self.fair_share) for project, used in self._usage.items()}

    # changing

    def register(self, agent: Agent) -> None:
        """Add `agent`, or refresh it from a newer report (GPUs, foreign processes, topology)."""
        agent_id = agent.agent_id
        releases = self._releases.get(agent_id, ())
        allocated = {gpu for release in releases for gpu in release.gpus}
        if missing := allocated - {gpu.index for gpu in agent.gpus}:
            raise FailedPrecondition(
                f"agent {agent_id} no longer reports GPUs {sorted(missing)}, which jobs "
                f"{self.jobs_on(agent_id)} hold; finish or requeue those jobs first"
            )
        if agent_id in self._agents:
            self._unindex(agent_id)
            self._forget_size(len(self._usable[agent_id]))
        usable = frozenset(gpu.index for gpu in agent.gpus if not gpu.busy_foreign)
        self._agents[agent_id] = agent
        self._usable[agent_id] = usable
        self._topology[agent_id] = _topology(agent.interconnect_groups, usable)
        self._free[agent_id] = _Free(
            usable - allocated,
            agent.millicores - sum(release.millicores for release in releases),
            agent.memory_mib - sum(release.memory_mib for release in releases),
        )
        self._releases[agent_id] = releases
        self._usable_gpus += len(usable)
        self._sizes[len(usable)] += 1
        self._index(agent_id)

    def remove_agent(self, agent_id: str) -> None:
        """Forget `agent_id`; its jobs must have been finished (or requeued) first."""
        if agent_id not in self._agents:
            raise NotFound(f"agent {agent_id} is not registered")
        if jobs := self.jobs_on(agent_id):
            raise FailedPrecondition(
                f"agent {agent_id} still runs jobs {list(jobs)}; finish or requeue them first"
            )
        self._unindex(agent_id)
        self._forget_size(len(self._usable[agent_id]))
        del self._agents[agent_id], self._usable[agent_id], self._topology[agent_id]
        del self._free[agent_id], self._releases[agent_id]

    def start(self, placements: Iterable[Placement], now: float) -> tuple[Allocation, ...]:
        """Allocate what `placements` decided, all or none; returns the new allocations."""
        allocations = tuple(
            Allocation(
                job_id=placement.job_id,
                project=placement.job.project,
                nodes=placement.nodes,
                millicores_per_node=placement.job.millicores_per_node,
                memory_mib_per_node=placement.job.memory_mib_per_node,
                started_at=now,
                ends_at=(
                    None
                    if placement.job.runtime_estimate_s is None
                    else now + placement.job.runtime_estimate_s
                ),
            )
            for placement in placements
        )
        if not allocations:
            return allocations
        self._check_fits(allocations)
        started: Counter[str] = Counter()
        with self._reindexing(allocations):
            for allocation in allocations:
                started[allocation.project] += self._occupy(allocation)
        for project, gpus in sorted(started.items()):
            self._settle(project, now, gpus)
        return allocations

    def finish(self, job_id: str, now: float) -> Allocation:
        """Release the resources of `job_id` (it ended, failed, was stopped or requeued)."""
        allocation = self._allocations.pop(job_id, None)
        if allocation is None:
            raise NotFound(f"job {job_id} holds no allocation")
        with self._reindexing([allocation]):
            for node in allocation.nodes:
                agent_id = node.agent_id
                free = self._free[agent_id]
                self._free[agent_id] = _Free(
                    free.gpus | (frozenset(node.gpus) & self._usable[agent_id]),
                    free.millicores + allocation.millicores_per_node,
                    free.memory_mib + allocation.memory_mib_per_node,
                )
                self._releases[agent_id] = tuple(
                    release for release in self._releases[agent_id] if release.job_id != job_id
                )
        self._allocated_gpus -= allocation.gpus
        self._settle(allocation.project, now, -allocation.gpus)
        return allocation

    # internals

    @property
    def _most_gpus(self) -> int:
        """The most usable GPUs any agent has."""
        return max(self._sizes, default=0)

    def _forget_size(self, gpus: int) -> None:
        self._usable_gpus -= gpus
        self._sizes[gpus] -= 1
        if not self._sizes[gpus]:
            del self._sizes[gpus]

    def _check_fits(self, allocations: Iterable[Allocation]) -> None:
        """Refuse allocations that would give a GPU twice or more CPU or memory than is free."""
        taken: dict[str, _Free] = {}
        for allocation in allocations:
            if allocation.job_id in self._allocations:
                raise AlreadyExists(f"job {allocation.job_id} is running already")
            agent_ids = [node.agent_id for node in allocation.nodes]
            if len(set(agent_ids)) != len(agent_ids):
                raise FailedPrecondition(
                    f"job {allocation.job_id} has two nodes on one agent: {agent_ids}"
                )
            for node in allocation.nodes:
                if node.agent_id not in self._agents:
                    raise NotFound(f"job {allocation.job_id}: agent {node.agent_id} is unknown")
                free = taken.get(node.agent_id, self._free[node.agent_id])
                wanted = frozenset(node.gpus)
                if len(wanted) != len(node.gpus) or not wanted <= free.gpus:
                    raise FailedPrecondition(
                        f"job {allocation.job_id}: GPUs {sorted(wanted - free.gpus)} of agent "
                        f"{node.agent_id} are not free"
                    )
                left = _Free(
                    free.gpus - wanted,
                    free.millicores - allocation.millicores_per_node,
                    free.memory_mib - allocation.memory_mib_per_node,
                )
                if left.millicores < 0 or left.memory_mib < 0:
                    raise FailedPrecondition(
                        f"job {allocation.job_id}: agent {node.agent_id} lacks the CPU or memory"
                    )
                taken[node.agent_id] = left

    def _occupy(self, allocation: Allocation) -> int:
        """Take what `allocation` holds (inside `_reindexing`; usage is settled apart);
        returns its GPU count."""
        ends_at = _NEVER if allocation.ends_at is None else allocation.ends_at
        gpus = 0
        for node in allocation.nodes:
            gpus += len(node.gpus)
            agent_id = node.agent_id
            free = self._free[agent_id]
            self._free[agent_id] = _Free(
                free.gpus - frozenset(node.gpus),
                free.millicores - allocation.millicores_per_node,
                free.memory_mib - allocation.memory_mib_per_node,
            )
            release = _Release(
                ends_at,
                allocation.job_id,
                node.gpus,
                allocation.millicores_per_node,
                allocation.memory_mib_per_node,
            )
            self._releases[agent_id] = _with_release(self._releases[agent_id], release)
        self._allocations[allocation.job_id] = allocation
        self._allocated_gpus += gpus
        return gpus

    def _settle(self, project: str, now: float, running_gpus_change: int) -> None:
        usage = self._usage.get(project, Usage(as_of=now))
        self._usage[project] = usage.settled(now, self.fair_share, running_gpus_change)

    @contextlib.contextmanager
    def _reindexing(self, allocations: Iterable[Allocation]) -> Iterator[None]:
        """Bring the indexes up to date with the resources of the agents of `allocations`,
        which change inside the block."""
        agent_ids = sorted(
            {node.agent_id for allocation in allocations for node in allocation.nodes}
        )
        # A batch that touches many agents (a first pass on an idle cluster) is cheaper to
        # index afresh than agent by agent.
        if len(agent_ids) * 8 <= len(self._agents):
            before = {a: (self._free[a], self._ready_of[a]) for a in agent_ids}
            yield
            for agent_id, (free_before, ready_before) in before.items():
                self._reindex(agent_id, free_before, ready_before)
            return
        yield
        self._by_free.clear()
        self._ready.clear()
        self._ready_of.clear()
        self._by_cpu.clear()
        self._by_memory.clear()
        for agent_id in self._agents:
            free = self._free[agent_id]
            self._by_free.setdefault(len(free.gpus), []).append(agent_id)
            if free.gpus:
                self._by_cpu.append((free.millicores, agent_id))
                self._by_memory.append((free.memory_mib, agent_id))
            ready = _gpu_ready_times(
                self._free[agent_id], self._releases[agent_id], self._usable[agent_id]
            )
            self._ready_of[agent_id] = ready
            for count, at in enumerate(ready, start=1):
                self._ready.setdefault(count, []).append((at, agent_id))
        for index in (self._by_free, self._ready):
            for entries in index.values():
                entries.sort()
        self._by_cpu.sort()
        self._by_memory.sort()

    def _index(self, agent_id: str) -> None:
        free = self._free[agent_id]
        bisect.insort(self._by_free.setdefault(len(free.gpus), []), agent_id)
        if free.gpus:
            bisect.insort(self._by_cpu, (free.millicores, agent_id))
            bisect.insort(self._by_memory, (free.memory_mib, agent_id))
        ready = _gpu_ready_times(
            self._free[agent_id], self._releases[agent_id], self._usable[agent_id]
        )
        self._ready_of[agent_id] = ready
        for count, at in enumerate(ready, start=1):
            bisect.insort(self._ready.setdefault(count, []), (at, agent_id))

    def _unindex(self, agent_id: str) -> None:
        free = self._free[agent_id]
        _remove_sorted(self._by_free[len(free.gpus)], agent_id)
        if free.gpus:
            _remove_sorted(self._by_cpu, (free.millicores, agent_id))
            _remove_sorted(self._by_memory, (free.memory_mib, agent_id))
        for count, at in enumerate(self._ready_of.pop(agent_id), start=1):
            _remove_sorted(self._ready[count], (at, agent_id))

    def _reindex(self, agent_id: str, before: _Free, ready_before: tuple[float, ...]) -> None:
        """Move the agent in the indexes, touching only the entries that changed (a job that
        ends or starts changes a few of its ready times, not all)."""
        free = self._free[agent_id]
        if len(free.gpus) != len(before.gpus):
            _remove_sorted(self._by_free[len(before.gpus)], agent_id)
            bisect.insort(self._by_free.setdefault(len(free.gpus), []), agent_id)
        _move_rich(self._by_cpu, self._by_memory, agent_id, before, free)
        ready = _gpu_ready_times(
            self._free[agent_id], self._releases[agent_id], self._usable[agent_id]
        )
        self._ready_of[agent_id] = ready
        changes = itertools.zip_longest(ready_before, ready)
        for count, (was, now) in enumerate(changes, start=1):
            if was != now:
                if was is not None:
                    _remove_sorted(self._ready[count], (was, agent_id))
                if now is not None:
                    bisect.insort(self._ready.setdefault(count, []), (now, agent_id))


def _move_rich(
    by_cpu: list[tuple[int, str]],
    by_memory: list[tuple[int, str]],
    agent_id: str,
    before: _Free,
    after: _Free,
) -> None:
    """Keep an agent's place in the by-CPU and by-memory indexes of agents with a GPU free."""
    if before.gpus and (not after.gpus or before.millicores != after.millicores):
        _remove_sorted(by_cpu, (before.millicores, agent_id))
    if after.gpus and (not before.gpus or before.millicores != after.millicores):
        bisect.insort(by_cpu, (after.millicores, agent_id))
    if before.gpus and (not after.gpus or before.memory_mib != after.memory_mib):
        _remove_sorted(by_memory, (before.memory_mib, agent_id))
    if after.gpus and (not before.gpus or before.memory_mib != after.memory_mib):
        bisect.insort(by_memory, (after.memory_mib, agent_id))


def _with_release(releases: tuple[_Release, ...], release: _Release) -> tuple[_Release, ...]:
    ordered = list(releases)
    bisect.insort(ordered, release)
    return tuple(ordered)


_Sortable = TypeVar("_Sortable", str, tuple[int, str], tuple[float, str], tuple[float, float, str])


def _remove_sorted(items: list[_Sortable], item: _Sortable) -> None:
    del items[bisect.bisect_left(items, item)]


def _gpu_ready_times(
    free: _Free, releases: tuple[_Release, ...], usable: frozenset[int]
) -> tuple[float, ...]:
    """When the agent will have 1, 2, ... GPUs free (-inf: now) if no other job starts."""
    times = [-math.inf] * len(free.gpus)
    count = len(free.gpus)
    for release in releases:
        count += len(usable.intersection(release.gpus))
        times.extend([release.ends_at] * (count - len(times)))
    return tuple(times)


def _ready_at(
    job: JobRequest, free: _Free, releases: tuple[_Release, ...], usable: frozenset[int]
) -> float | None:
    """When one node of `job` fits on the agent if no other job starts (None: never)."""
    gpus, millicores, memory = len(free.gpus), free.millicores, free.memory_mib
    need_gpus, need_cpu, need_memory = (
        job.gpus_per_node,
        job.millicores_per_node,
        job.memory_mib_per_node,
    )
    if gpus >= need_gpus and millicores >= need_cpu and memory >= need_memory:
        return -math.inf
    # Running jobs only give resources back, so the first moment all three suffice is the answer.
    for release in releases:
        gpus += len(usable.intersection(release.gpus))
        millicores += release.millicores
        memory += release.memory_mib
        if gpus >= need_gpus and millicores >= need_cpu and memory >= need_memory:
            return release.ends_at
    return None


# --- the queue ----------------------------------------------------------------------------------


class _Entry(NamedTuple):
    submitted_at: float
    job_id: str
    job: JobRequest
    group: _Group


class _Least(Generic[_Number]):
    """A multiset of numbers that knows its least member."""

    __slots__ = ("_counts", "_least")

    def __init__(self) -> None:
        self._counts: Counter[_Number] = Counter()
        self._least: _Number | None = None

    def add(self, value: _Number) -> None:
        self._counts[value] += 1
        if self._least is not None and value < self._least:
            self._least = value

    def remove(self, value: _Number) -> None:
        self._counts[value] -= 1
        if not self._counts[value]:
            del self._counts[value]
            if value == self._least:
                self._least = None  # found again when next asked

    def __contains__(self, value: object) -> bool:
        return value in self._counts

    def least(self) -> _Number:
        if self._least is None:
            self._least = min(self._counts)
        return self._least

    def __bool__(self) -> bool:
        return bool(self._counts)


@dataclass(slots=True)
class _GroupNeeds:
    """What the queued jobs of one group ask: CPU and memory per node, runtime estimates."""

    millicores: _Least[int] = field(default_factory=_Least)
    memory_mib: _Least[int] = field(default_factory=_Least)
    #: The jobs that declare a runtime estimate, shortest first: (estimate, submitted_at, id).
    by_estimate: list[tuple[float, float, str]] = field(default_factory=list)

    def add(self, job: JobRequest) -> None:
        self.millicores.add(job.millicores_per_node)
        self.memory_mib.add(job.memory_mib_per_node)
        if job.runtime_estimate_s is not None:
            bisect.insort(self.by_estimate, _estimate_order(job))

    def remove(self, job: JobRequest) -> None:
        self.millicores.remove(job.millicores_per_node)
        self.memory_mib.remove(job.memory_mib_per_node)
        if job.runtime_estimate_s is not None:
            _remove_sorted(self.by_estimate, _estimate_order(job))

    def shortest(self) -> float:
        """The shortest runtime estimate in the group (inf: none declared)."""
        return self.by_estimate[0][0] if self.by_estimate else math.inf

    def ending_within(self, seconds: float) -> list[tuple[float, float, str]]:
        """The jobs whose estimate is at most `seconds`."""
        return self.by_estimate[: bisect.bisect_right(self.by_estimate, (seconds, math.inf))]


def _estimate_order(job: JobRequest) -> tuple[float, float, str]:
    return (job.runtime_estimate_s or math.inf, job.submitted_at, job.job_id)


def _entry_order(entry: _Entry) -> tuple[float, str]:
    return entry.submitted_at, entry.job_id


class JobQueue:
    """The jobs waiting to run, indexed by priority and project in submission order.

    Kept in memory by the scheduler, changed as jobs are queued and placed; `schedule` reads it
    and never changes it. Job ids are unique.
    """

    def __init__(self, jobs: Iterable[JobRequest] = ()) -> None:
        self._jobs: dict[str, JobRequest] = {}
        # priority -> project -> entries sorted by (submitted_at, job_id)
        self._levels: dict[int, dict[str, list[_Entry]]] = {}
        self._groups: dict[_Group, _GroupNeeds] = {}
        # What a pass reads of the groups, kept until a job changes it (most do not).
        self._cheapest_now: dict[_Group, tuple[int, int]] | None = None
        self._demand_now: _Demand | None = None
        for job in jobs:
            self.add(job)

    def add(self, job: JobRequest) -> None:
        """Queue `job`."""
        if job.job_id in self._jobs:
            raise AlreadyExists(f"job {job.job_id} is queued already")
        entry = _Entry(job.submitted_at, job.job_id, job, job._group)
        fifo = self._levels.setdefault(job.priority, {}).setdefault(job.project, [])
        if fifo and _entry_order(entry) < _entry_order(fifo[-1]):
            bisect.insort(fifo, entry, key=_entry_order)
        else:
            fifo.append(entry)  # the common case: jobs arrive in submission order
        needs = self._groups.get(entry.group)
        if needs is None:
            needs = self._groups[entry.group] = _GroupNeeds()
            self._forget_cheapest()
        elif self._cheapest_now is not None:
            least_cpu, least_memory = self._cheapest_now[entry.group]
            if job.millicores_per_node < least_cpu or job.memory_mib_per_node < least_memory:
                self._forget_cheapest()
        needs.add(job)
        self._jobs[job.job_id] = job

    def remove(self, job_id: str) -> JobRequest:
        """Take `job_id` out of the queue (placed or cancelled) and return it."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            raise NotFound(f"job {job_id} is not queued")
        projects = self._levels[job.priority]
        fifo = projects[job.project]
        # Placed jobs are mostly the oldest of their project.
        at = (
            0
            if fifo[0].job_id == job_id
            else bisect.bisect_left(fifo, (job.submitted_at, job.job_id), key=_entry_order)
        )
        group = fifo[at].group
        del fifo[at]
        if not fifo:
            del projects[job.project]
            if not projects:
                del self._levels[job.priority]
        needs = self._groups[group]
        needs.remove(job)
        if not needs.millicores:
            del self._groups[group]
            self._forget_cheapest()
        elif self._cheapest_now is not None:
            least_cpu, least_memory = self._cheapest_now[group]
            cpu, memory = job.millicores_per_node, job.memory_mib_per_node
            if (cpu == least_cpu and cpu not in needs.millicores) or (
                memory == least_memory and memory not in needs.memory_mib
            ):
                self._forget_cheapest()
        return job

    def get(self, job_id: str) -> JobRequest | None:
        return self._jobs.get(job_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def _cheapest(self) -> Mapping[_Group, tuple[int, int]]:
        """Per group, the least CPU and the least memory any of its queued jobs asks."""
        if self._cheapest_now is None:
            self._cheapest_now = {
                group: (needs.millicores.least(), needs.memory_mib.least())
                for group, needs in self._groups.items()
            }
        return MappingProxyType(self._cheapest_now)

    def _demand(self) -> _Demand:
        """The demand of the queued groups."""
        if self._demand_now is None:
            self._demand_now = _demand(self._cheapest())
        return self._demand_now

    def _forget_cheapest(self) -> None:
        self._cheapest_now = None
        self._demand_now = None

    def __iter__(self) -> Iterator[JobRequest]:
        """By priority, then submission time (fair share is decided in a pass, not here)."""
        for priority in sorted(self._levels, reverse=True):
            merged = heapq.merge(*self._levels[priority].values(), key=_entry_order)
            yield from (entry.job for entry in merged)


# --- GPU choice -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: interned by _topology()
class _Topology:
    """An agent's interconnect groups as placement reads them."""

    group_of: Mapping[int, int]
    #: [g]: the fewest groups that hold g usable GPUs when the agent is idle.
    fewest_groups: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def _topology(groups: tuple[tuple[int, ...], ...], usable: frozenset[int]) -> _Topology | None:
    if not groups:
        return None
    group_of = {gpu: number for number, members in enumerate(groups) for gpu in members}
    # A GPU outside every group is a group of its own: nothing fast links it to the others.
    sizes = sorted(Counter(group_of.get(gpu, -1 - gpu) for gpu in usable).values(), reverse=True)
    fewest = [0]
    for used, size in enumerate(sizes, start=1):
        fewest.extend([used] * size)
    return _Topology(group_of, tuple(fewest))


@functools.lru_cache(maxsize=4096)
def _lowest(free: frozenset[int], count: int) -> tuple[int, ...]:
    return tuple(sorted(free)[:count])


@functools.lru_cache(maxsize=65536)
def _grouped(free: frozenset[int], count: int, topology: _Topology) -> tuple[tuple[int, ...], int]:
    """`count` of the `free` GPUs in as few groups as possible, and how many groups that is
    beyond what an idle agent would need."""
    members: dict[int, list[int]] = {}
    for gpu in sorted(free):
        members.setdefault(topology.group_of.get(gpu, -1 - gpu), []).append(gpu)
    smallest_first = sorted(members.values(), key=lambda group: (len(group), group[0]))
    chosen: list[int] = []
    used = 0
    while len(chosen) < count:
        wanted = count - len(chosen)
        # The smallest group that holds the rest keeps bigger groups whole for bigger jobs;
        # when none does, take the biggest group whole and look again.
        group = next((g for g in smallest_first if len(g) >= wanted), smallest_first[-1])
        smallest_first.remove(group)
        chosen.extend(group[:wanted])
        used += 1
    return tuple(sorted(chosen)), max(0, used - topology.fewest_groups[count])


def _demand(groups: Mapping[_Group, tuple[int, int]]) -> _Demand:
    """The demand of the queued groups (the same object while the mix stays the same)."""
    cheapest: dict[int, tuple[int, int]] = {}
    for group, (millicores, memory) in groups.items():
        if count := group.gpus_per_node:
            least_cpu, least_memory = cheapest.get(count, (millicores, memory))
            cheapest[count] = (min(least_cpu, millicores), min(least_memory, memory))
    return _Demand.of(tuple(sorted(((g, *need) for g, need in cheapest.items()), reverse=True)))


class _Demand:
    """The queued job sizes as one node needs them, to tell which free GPUs are still useful.

    For each per-node GPU count in the queue it keeps the least CPU and memory asked with it
    (an optimistic view: free GPUs are unusable only if even the cheapest jobs cannot use them).
    Interned by that mix, which changes rarely, so its answers are remembered across passes.
    """

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(sizes: tuple[tuple[int, int, int], ...]) -> _Demand:
        return _Demand(sizes)

    def __init__(self, sizes: tuple[tuple[int, int, int], ...]) -> None:
        self._sizes = sizes  # (GPUs, least CPU, least memory), most GPUs first
        self._unusable: dict[tuple[int, int, int], int] = {}
        self._packed: dict[tuple[int, int, int, int], int] = {}

    def unusable(self, gpus: int, millicores: int, memory_mib: int) -> int:
        """Of `gpus` free GPUs beside this CPU and memory, how many no queued mix could use."""
        key = (gpus, millicores, memory_mib)
        left = self._unusable.get(key)
        if left is None:
            if len(self._unusable) > _MEMO_LIMIT:  # free CPU and memory take endless values
                self._unusable.clear()
                self._packed.clear()
            left = self._unusable[key] = gpus - self._packable(gpus, millicores, memory_mib, 0)
        return left

    def _fills(self, gpus: int, millicores: int, memory_mib: int) -> bool:
        """Whether copies of one queued size fill all `gpus` (the common case, known at once)."""
        for size, cpu, memory in self._sizes:
            if size and not gpus % size:
                copies = gpus // size
                if copies * cpu <= millicores and copies * memory <= memory_mib:
                    return True
        return False

    def _packable(self, gpus: int, millicores: int, memory_mib: int, first: int) -> int:
        """The most GPUs queued sizes (from `first` on, each any number of times) can fill."""
        key = (gpus, millicores, memory_mib, first)
        best = self._packed.get(key)
        if best is not None:
            return best
        if not first and self._fills(gpus, millicores, memory_mib):
            self._packed[key] = gpus
            return gpus
        best = 0
        for index in range(first, len(self._sizes)):
            size, cpu, memory = self._sizes[index]
            if size <= gpus and cpu <= millicores and memory <= memory_mib:
                filled = size + self._packable(
                    gpus - size, millicores - cpu, memory_mib - memory, index
                )
                best = max(best, filled)
                if best == gpus:
                    break
        self._packed[key] = best
        return best


# A candidate's rank (lower is better): GPUs made unusable, free GPUs left on the agent, seconds
# by which the job delays the agent's last expected release, extra interconnect groups, agent id.
# The baselines use only the parts they know.
_Rank: TypeAlias = tuple[int, int, float, int, str]


class _Rule:
    """How a pass ranks the agents and GPUs that can host a node: plain best fit."""

    #: Whether the rank starts with (GPUs made unusable, GPUs left) and reads nothing of an
    #: agent but its free resources, topology and last release. A scan then skips agents alike
    #: an earlier one (they rank alike but for the id) and stops at agents with more GPUs free
    #: than enough candidates that make nothing unusable.
    prunes = False

    def scan(self, work: _Workspace, gpus: int) -> Iterator[str]:
        """Agents with at least `gpus` free, in the order this rule would rather use them."""
        by_free = work.by_free
        for count in range(gpus, work.state._most_gpus + 1):
            yield from by_free.get(count, ())

    def rank(
        self, job: JobRequest, agent_id: str, free: _Free, work: _Workspace, demand: _Demand
    ) -> tuple[_Rank, tuple[int, ...], bool]:
        """The candidate's rank, its GPUs, and whether it is ideal: no candidate later in
        `scan` order can rank better, so the scan may stop."""
        left = len(free.gpus) - job.gpus_per_node
        gpus = self.pick(free.gpus, job.gpus_per_node, agent_id, work)
        return (0, left, 0.0, 0, agent_id), gpus, True

    def pick(
        self, free: frozenset[int], count: int, agent_id: str, work: _Workspace
    ) -> tuple[int, ...]:
        """Which `count` of the `free` GPUs of `agent_id` a node gets."""
        return _lowest(free, count)


class _FirstFit(_Rule):
    """The first agents by id that can host a node, their lowest GPU indices."""

    def scan(self, work: _Workspace, gpus: int) -> Iterator[str]:
        by_free = work.by_free
        yield from heapq.merge(
            *(
                by_free[count]
                for count in range(gpus, work.state._most_gpus + 1)
                if count in by_free
            )
        )

    def rank(
        self, job: JobRequest, agent_id: str, free: _Free, work: _Workspace, demand: _Demand
    ) -> tuple[_Rank, tuple[int, ...], bool]:
        return (
            (0, 0, 0.0, 0, agent_id),
            self.pick(free.gpus, job.gpus_per_node, agent_id, work),
            True,
        )


class _LeastFragmenting(_Rule):
    """Fewest GPUs made unusable, then best fit, then the least delay to the agent's last
    expected release, then fewest interconnect groups, then id."""

    prunes = True

    def rank(
        self, job: JobRequest, agent_id: str, free: _Free, work: _Workspace, demand: _Demand
    ) -> tuple[_Rank, tuple[int, ...], bool]:
        count = job.gpus_per_node
        topology = work.state._topology[agent_id]
        if topology is None:
            gpus, extra_groups = _lowest(free.gpus, count), 0
        else:
            gpus, extra_groups = _grouped(free.gpus, count, topology)
        left = len(free.gpus) - count
        made_unusable = demand.unusable(
            left,
            free.millicores - job.millicores_per_node,
            free.memory_mib - job.memory_mib_per_node,
        ) - demand.unusable(len(free.gpus), free.millicores, free.memory_mib)
        # The job's own size is in the mix, so placing it cannot make free GPUs more usable;
        # a negative figure would only be the packing's approximation.
        made_unusable = max(made_unusable, 0)
        # A job that ends after the agent's other jobs keeps the agent from being whole again
        # (for the big sizes) for longer: put jobs that end alike together. Unknown ends count
        # as never, so jobs of unknown length gather on the agents that already hold one.
        estimate = job.runtime_estimate_s
        ends_at = _NEVER if estimate is None else work.now + estimate
        last = work.last_release(agent_id)
        if ends_at <= last:
            delay = 0.0
        elif ends_at == _NEVER:
            delay = _NEVER
        else:
            delay = ends_at - max(last, work.now)
        ideal = made_unusable == 0 and delay == 0 and extra_groups == 0
        return (made_unusable, left, delay, extra_groups, agent_id), gpus, ideal

    def pick(
        self, free: frozenset[int], count: int, agent_id: str, work: _Workspace
    ) -> tuple[int, ...]:
        topology = work.state._topology[agent_id]
        return _lowest(free, count) if topology is None else _grouped(free, count, topology)[0]


_LEAST_FRAGMENTING = _LeastFragmenting()
_BEST_FIT = _Rule()
_FIRST_FIT = _FirstFit()


# --- one scheduling pass ------------------------------------------------------------------------


class _Workspace:
    """A pass's private view of free resources, changed as the pass places jobs."""

    def __init__(self, state: ClusterState, now: float, demand: _Demand | None) -> None:
        """`demand`: what the queued jobs ask, if none of them is CPU-only."""
        self.state = state
        self.now = now
        self.demand = demand
        # Shared with the state until this pass writes to them (many passes place nothing).
        self.free = state._free
        self._owns_free = False
        self.by_free = dict(state._by_free)
        self._owned: set[int] = set()
        self.by_cpu = state._by_cpu
        self.by_memory = state._by_memory
        self._owns_rich = False
        #: What the jobs this pass placed will release, per agent, and the last of it.
        self.added: dict[str, list[_Release]] = {}
        self._last_added: dict[str, float] = {}

    def last_release(self, agent_id: str) -> float:
        """When the agent's last running or newly placed job is expected to end (-inf: none
        runs; `_NEVER`: one of unknown length does)."""
        releases = self.state._releases[agent_id]
        last = releases[-1].ends_at if releases else -math.inf
        added = self._last_added.get(agent_id, last)
        return added if added > last else last

    def releases(self, agent_id: str) -> tuple[_Release, ...]:
        """What the agent's running jobs, and the jobs this pass placed there, will release."""
        added = self.added.get(agent_id)
        releases = self.state._releases[agent_id]
        return releases if added is None else tuple(sorted((*releases, *added)))

    def with_room(self, millicores: int, memory_mib: int) -> list[tuple[int, str]] | None:
        """Agents with a GPU free and at least this CPU (or this memory) free, whichever are
        fewer; None when too many to look at one by one (scan by free GPUs instead)."""
        by_cpu, by_memory = self.by_cpu, self.by_memory
        cpu_from = bisect.bisect_left(by_cpu, (millicores, ""))
        memory_from = bisect.bisect_left(by_memory, (memory_mib, ""))
        fewest = min(len(by_cpu) - cpu_from, len(by_memory) - memory_from)
        if fewest > _SEARCH_BREADTH:
            return None
        if len(by_cpu) - cpu_from == fewest:
            return by_cpu[cpu_from:]
        return by_memory[memory_from:]

    def occupy(self, job: JobRequest, node: NodeAssignment, now: float) -> None:
        agent_id = node.agent_id
        free = self.free[agent_id]
        left = _Free(
            free.gpus - frozenset(node.gpus),
            free.millicores - job.millicores_per_node,
            free.memory_mib - job.memory_mib_per_node,
        )
        if not self._owns_free:
            self.free = dict(self.free)
            self._owns_free = True
        self.free[agent_id] = left
        _remove_sorted(self._writable(len(free.gpus)), agent_id)
        gpus_left = len(left.gpus)
        # An agent none of whose free GPUs any queued job can use drops out of the scans (it
        # stays so for the pass: a pass only takes resources); the pass decides no CPU-only jobs
        # when `demand` is set, so nothing could be placed on it any more.
        demand = self.demand
        if (
            demand is None
            or not gpus_left
            or demand.unusable(gpus_left, left.millicores, left.memory_mib) < gpus_left
        ):
            bisect.insort(self._writable(gpus_left), agent_id)
        if not self._owns_rich:
            self.by_cpu, self.by_memory = list(self.by_cpu), list(self.by_memory)
            self._owns_rich = True
        _move_rich(self.by_cpu, self.by_memory, agent_id, free, left)
        estimate = job.runtime_estimate_s
        ends_at = _NEVER if estimate is None else now + estimate
        release = _Release(
            ends_at, job.job_id, node.gpus, job.millicores_per_node, job.memory_mib_per_node
        )
        self.added.setdefault(agent_id, []).append(release)
        self._last_added[agent_id] = max(ends_at, self._last_added.get(agent_id, -math.inf))

    def _writable(self, count: int) -> list[str]:
        if count not in self._owned:
            self.by_free[count] = list(self.by_free.get(count, ()))
            self._owned.add(count)
        return self.by_free[count]


def _can_host_gpus(group: _Group, agent_id: str, free: _Free, state: ClusterState) -> bool:
    """Whether the agent could host a node of `group` if CPU and memory were no object."""
    return (
        len(free.gpus) >= group.gpus_per_node
        and agent_id not in group.excluded_agents
        and (group.capability is None or group.capability in state._agents[agent_id].capabilities)
    )


def _can_host(job: JobRequest, agent_id: str, free: _Free, state: ClusterState) -> bool:
    return (
        len(free.gpus) >= job.gpus_per_node
        and free.millicores >= job.millicores_per_node
        and free.memory_mib >= job.memory_mib_per_node
        and agent_id not in job.excluded_agents
        and (job.capability is None or job.capability in state._agents[agent_id].capabilities)
    )


def _choose_nodes(
    rule: _Rule,
    job: JobRequest,
    work: _Workspace,
    demand: _Demand,
    overrides: Mapping[str, _Free],
) -> tuple[NodeAssignment, ...] | None:
    """The best `job.nodes` distinct agents (and GPUs) for `job` now, or None if too few can
    host it. `overrides`: agents whose free resources the pass sees differently (held back)."""
    state = work.state
    found: list[tuple[_Rank, tuple[int, ...]]] = []
    for agent_id in sorted(overrides):
        if _can_host(job, agent_id, overrides[agent_id], state):
            found.append(rule.rank(job, agent_id, overrides[agent_id], work, demand)[:2])
    # The hot loop of a pass, hence the locals. The scan visits agents in the rule's order, so
    # an ideal candidate outranks every later one.
    nodes, cpu, memory = job.nodes, job.millicores_per_node, job.memory_mib_per_node
    excluded, capability, agents = job.excluded_agents, job.capability, state._agents
    free_now, topologies, per_node = work.free, state._topology, job.gpus_per_node
    ideal = 0
    enough = max(nodes, _SEARCH_BREADTH)
    # When few agents have the CPU or the memory the job asks, rank them all; otherwise scan
    # in the rule's order and stop early.
    rich = work.with_room(cpu, memory) if per_node else None
    candidates = rule.scan(work, per_node) if rich is None else (a for _, a in rich)
    prunes = rule.prunes
    state_releases, last_added = state._releases, work._last_added  # last_release(), inlined
    # Agents alike in all the rank reads (free resources, topology, last end) rank alike but
    # for their ids, and come in id order: the first `nodes` of them are ranked, the rest not.
    seen: dict[tuple[_Free, _Topology | None, float], int] = {}
    # The GPUs left by the candidates that make nothing unusable, fewest first: the scan
    # visits agents by free GPUs, so once `nodes` of them leave fewer than the next agent
    # would, no later agent can be among the best; with as few left, a later one can only win
    # on when its jobs end, looked for among the next _TIE_BREADTH agents.
    clean: list[int] = []
    limit = enough
    looked = 0  # candidates that could host a node, ranked or skipped as twins
    for agent_id in candidates:
        free = free_now[agent_id]
        if (
            free.millicores < cpu
            or free.memory_mib < memory
            or len(free.gpus) < per_node
            or agent_id in overrides
            or agent_id in excluded
            or (capability is not None and capability not in agents[agent_id].capabilities)
        ):
            continue
        looked += 1
        if prunes:
            if (
                rich is None
                and len(clean) >= nodes
                and (clean[nodes - 1] < len(free.gpus) - per_node or looked > limit)
            ):
                break
            releases = state_releases[agent_id]
            last = releases[-1].ends_at if releases else -math.inf
            added = last_added.get(agent_id, last)
            twin = (free, topologies[agent_id], added if added > last else last)
            twins = seen.get(twin, 0)
            if twins >= nodes:
                if rich is None and looked >= enough:
                    break
                continue
            seen[twin] = twins + 1
        rank, gpus, is_ideal = rule.rank(job, agent_id, free, work, demand)
        found.append((rank, gpus))
        if prunes and not rank[0]:
            bisect.insort(clean, rank[1])
            if len(clean) == nodes:
                limit = looked + _TIE_BREADTH
        ideal += is_ideal
        if rich is None and (ideal >= nodes or looked >= enough):
            break
    if len(found) < nodes:
        return None
    if len(found) > 1:
        found.sort()
    return tuple([NodeAssignment(rank[-1], gpus) for rank, gpus in found[:nodes]])


def _unfit_requests(
    groups: Mapping[_Group, tuple[int, int]], work: _Workspace, overrides: Mapping[str, _Free]
) -> dict[_Group, list[tuple[int, int]] | None]:
    """Per group, the least (CPU, memory) requests that none of its jobs can get now: the inner
    corners of the skyline of what the agents with enough free GPUs have left (`groups` maps
    each to the least any of its jobs asks; `overrides`: agents seen differently, as outside
    the holds). None for a gang that some agents may fit: which sets fit a gang is no skyline."""
    state = work.state
    unfit: dict[_Group, list[tuple[int, int]] | None] = {}
    free_now, agents = work.free, state._agents
    for group, (least_cpu, least_memory) in groups.items():
        # Agents without the CPU or memory for any job of the group count for nothing.
        offers = [
            (free.millicores, free.memory_mib)
            for agent_id, free in overrides.items()
            if free.millicores >= least_cpu
            and free.memory_mib >= least_memory
            and _can_host_gpus(group, agent_id, free, state)
        ]
        per_node, excluded, capability = (
            group.gpus_per_node,
            group.excluded_agents,
            group.capability,
        )
        rich = work.with_room(least_cpu, least_memory) if per_node else None
        if rich is None:
            agent_ids: Iterable[str] = _Rule.scan(_BEST_FIT, work, per_node)
        else:
            agent_ids = (agent_id for _, agent_id in rich)
        # The hot loop of a reservation, hence _can_host_gpus inlined.
        for agent_id in agent_ids:
            free = free_now[agent_id]
            if (
                free.millicores >= least_cpu
                and free.memory_mib >= least_memory
                and len(free.gpus) >= per_node
                and agent_id not in overrides
                and agent_id not in excluded
                and (capability is None or capability in agents[agent_id].capabilities)
            ):
                offers.append((free.millicores, free.memory_mib))
        if not offers:
            unfit[group] = [(0, 0)]  # nothing of this group fits
        elif group.nodes > 1:
            unfit[group] = None if len(offers) >= group.nodes else [(0, 0)]
        else:
            unfit[group] = _corners(_skyline(offers))
    return unfit


def _skyline(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (CPU, memory) points no other point beats in both, CPU descending."""
    points.sort(reverse=True)
    skyline: list[tuple[int, int]] = []
    for point in points:
        if not skyline or point[1] > skyline[-1][1]:
            skyline.append(point)
    return skyline


def _corners(skyline: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The least (CPU, memory) requests that no point of `skyline` (CPU descending) covers."""
    corners = [(skyline[0][0] + 1, 0), (0, skyline[-1][1] + 1)]
    for (_, less_memory), (less_cpu, _) in itertools.pairwise(skyline):
        corners.append((less_cpu + 1, less_memory + 1))
    return corners


@dataclass(slots=True)
class _Hold:
    """What a reservation needs from one agent: its GPUs, and the CPU and memory the agent
    can still lend to jobs that run past the reservation's start."""

    gpus: frozenset[int]
    spare_millicores: int
    spare_memory_mib: int


def _reserve(
    rule: _Rule, job: JobRequest, work: _Workspace, now: float
) -> tuple[Reservation, dict[str, _Hold]] | None:
    """The earliest start of `job` and where, if no job started after now; None: never."""
    state = work.state
    earliest: list[tuple[float, str]] = []  # the job.nodes earliest (start, agent) so far

    def offer(agent_id: str, free: _Free, releases: tuple[_Release, ...]) -> None:
        agent = state._agents[agent_id]
        if (
            agent_id in job.excluded_agents
            or (job.capability is not None and job.capability not in agent.capabilities)
            or len(state._usable[agent_id]) < job.gpus_per_node
        ):
            return
        at = _ready_at(job, free, releases, state._usable[agent_id])
        if at is not None:
            bisect.insort(earliest, (max(at, now), agent_id))
            del earliest[job.nodes :]

    for agent_id in sorted(work.added):
        offer(agent_id, work.free[agent_id], work.releases(agent_id))
    if job.gpus_per_node:
        # By when each agent will have enough GPUs: CPU and memory can only make it later.
        for gpus_at, agent_id in state._ready.get(job.gpus_per_node, ()):
            if len(earliest) == job.nodes and max(gpus_at, now) > earliest[-1][0]:
                break
            if agent_id not in work.added:
                offer(agent_id, state._free[agent_id], state._releases[agent_id])
    else:
        for agent_id in state._agents:
            if agent_id not in work.added:
                offer(agent_id, state._free[agent_id], state._releases[agent_id])
    if len(earliest) < job.nodes:
        return None
    starts_at = earliest[-1][0]
    nodes = []
    holds = {}
    for _, agent_id in earliest:
        free = work.free[agent_id]
        by_then = [r for r in work.releases(agent_id) if r.ends_at <= starts_at]
        gpus_then = free.gpus | (
            frozenset(gpu for r in by_then for gpu in r.gpus) & state._usable[agent_id]
        )
        gpus = rule.pick(gpus_then, job.gpus_per_node, agent_id, work)
        nodes.append(NodeAssignment(agent_id, gpus))
        holds[agent_id] = _Hold(
            frozenset(gpus),
            free.millicores + sum(r.millicores for r in by_then) - job.millicores_per_node,
            free.memory_mib + sum(r.memory_mib for r in by_then) - job.memory_mib_per_node,
        )
    when = None if starts_at == _NEVER else starts_at
    return Reservation(job.job_id, when, tuple(nodes)), holds


class _Misfits:
    """Requests that failed to fit during a pass, per group: a job of the group that asks at
    least as much CPU and memory cannot fit either, since a pass only takes resources away."""

    def __init__(self, cheapest: Mapping[_Group, tuple[int, int]]) -> None:
        self._cheapest = cheapest
        self._failed: dict[_Group, list[tuple[int, int]]] = {}  # the least failing requests
        #: Groups none of whose queued jobs can fit.
        self.covered: set[_Group] = set()

    def cover(self, group: _Group, millicores: int, memory_mib: int) -> bool:
        """Whether a request like this is known not to fit."""
        for cpu, memory in self._failed.get(group, ()):
            if cpu <= millicores and memory <= memory_mib:
                return True
        return False

    def add(self, group: _Group, requests: Iterable[tuple[int, int]]) -> None:
        """Remember that these (CPU, memory) requests of `group` cannot fit."""
        for millicores, memory_mib in requests:
            if self.cover(group, millicores, memory_mib):
                continue
            failed = [
                (cpu, memory)
                for cpu, memory in self._failed.get(group, ())
                if not (cpu >= millicores and memory >= memory_mib)
            ]
            failed.append((millicores, memory_mib))
            self._failed[group] = failed
        if self.cover(group, *self._cheapest[group]):
            self.covered.add(group)


class _Pass:
    """One scheduling pass over the queue; `run` returns its decisions."""

    def __init__(
        self,
        rule: _Rule,
        state: ClusterState,
        queue: JobQueue,
        now: float,
        backfill_depth: int,
    ) -> None:
        self.rule = rule
        self.state = state
        self.queue = queue
        self.now = now
        self.backfill_depth = backfill_depth
        cheapest = queue._cheapest()
        self.cheapest = cheapest
        self.groups = cheapest.keys()
        self.demand = queue._demand()
        cpu_only = any(not group.gpus_per_node for group in cheapest)
        self.work = _Workspace(state, now, None if cpu_only else self.demand)
        self.usage = state.usage(now)
        self.placements: list[Placement] = []
        self.stalled: list[Stalled] = []
        self.reservation: Reservation | None = None
        self.holds: dict[str, _Hold] = {}
        self._outside: dict[str, _Free] | None = None
        # What cannot fit anywhere any more, and what cannot fit outside the reservation's holds.
        self.misfits = _Misfits(cheapest)
        self.misfits_outside_holds = _Misfits(cheapest)
        self.stalled_misfits = _Misfits(cheapest)  # cannot start even if every job ended
        self.backfill_seen = 0
        #: Groups none of whose jobs can start any more this pass.
        self.done: set[_Group] = set()
        self.finished = not cheapest  # nothing else in the queue can start this pass
        #: Only jobs that end before the reservation starts can start, on what it holds.
        self.only_short_jobs_can_start = False

    def run(self) -> Decisions:
        for priority in sorted(self.queue._levels, reverse=True):
            if not self._run_level(self.queue._levels[priority]):
                break
        return Decisions(tuple(self.placements), self.reservation, tuple(self.stalled))

    def _standing(self, project: str) -> float:
        """The project's usage per share weight, counting what this pass has placed."""
        return self.usage.get(project, 0.0) / self.state.fair_share.weight(project)

    def _run_level(self, projects: Mapping[str, list[_Entry]]) -> bool:
        """Place what fits of one priority level, projects by fair share; False: pass is over."""
        # Each project's jobs in submission order, the project furthest below its share first.
        # A project's standing changes only when it gets a placement, so it keeps its turn
        # (the inner loop) while its jobs do not start.
        turns = [(self._standing(project), project) for project in projects]
        heapq.heapify(turns)
        position = dict.fromkeys(projects, 0)
        while turns:
            project = turns[0][1]
            fifo = projects[project]
            index = position[project]
            started = False
            end = len(fifo)
            while index < end and not started:
                entry = fifo[index]
                index += 1
                if self.reservation is not None:
                    # Every job looked at behind the reservation counts, skipped or not.
                    if entry.group in self.done:
                        # The hot loop of a long queue: skip the whole run of such jobs.
                        done, skipped = self.done, index
                        while index < end and fifo[index].group in done:
                            index += 1
                        self.backfill_seen += 1 + index - skipped
                        if self.backfill_seen > self.backfill_depth:
                            return False
                        continue
                    self.backfill_seen += 1
                    if self.backfill_seen > self.backfill_depth:
                        return False
                started = self._decide(entry.job, entry.group)
                if self.finished:
                    return False
                if self.only_short_jobs_can_start:
                    self.only_short_jobs_can_start = False
                    short = self._short_jobs()
                    if short is not None:
                        self._backfill(short)
                        return False
            position[project] = index
            if started:
                heapq.heapreplace(turns, (self._standing(project), project))
            else:
                heapq.heappop(turns)
        return True

    def _short_jobs(self) -> list[JobRequest] | None:
        """The queued jobs that end before the reservation starts, in queue order (by priority
        and submission), if there are few; None if too many to be worth listing."""
        window = self._window()
        found: list[JobRequest] = []
        jobs = self.queue._jobs
        for group in self.groups:
            if group not in self.misfits.covered:
                short = self.queue._groups[group].ending_within(window)
                if len(found) + len(short) > _SEARCH_BREADTH:
                    return None
                found.extend(jobs[job_id] for *_, job_id in short)
        found.sort(key=lambda job: (-job.priority, job.submitted_at, job.job_id))
        return found

    def _backfill(self, short: list[JobRequest]) -> None:
        """Start what fits of these jobs, each of which ends before the reservation starts."""
        placed = {placement.job_id for placement in self.placements}
        for job in short:
            group = job._group
            if job.job_id in placed or self.misfits.cover(
                group, job.millicores_per_node, job.memory_mib_per_node
            ):
                continue
            nodes = _choose_nodes(self.rule, job, self.work, self.demand, {})
            if nodes is None:
                self._misfit(job, group, anywhere=True)
                if self.finished:
                    return
            else:
                self._place(job, nodes, backfilled=True, outlives_reservation=False)

    def _decide(self, job: JobRequest, group: _Group) -> bool:
        """Place `job` now if it may start; True if it did."""
        cpu, memory = job.millicores_per_node, job.memory_mib_per_node
        reservation = self.reservation
        if reservation is None:
            # The first job that cannot start now gets the reservation, unless it could not
            # start even if every running job ended (then the next one does).
            if self.stalled_misfits.cover(group, cpu, memory):
                return False
            if not self.misfits.cover(group, cpu, memory):
                nodes = _choose_nodes(self.rule, job, self.work, self.demand, {})
                if nodes is not None:
                    self._place(job, nodes, backfilled=False, outlives_reservation=False)
                    return True
                # What else of the group cannot fit is worked out with the reservation.
                self.misfits.add(group, [(cpu, memory)])
                self.misfits_outside_holds.add(group, [(cpu, memory)])
            self._reserve_for(job, group)
            return False
        if self.misfits.cover(group, cpu, memory):
            return False
        estimate = job.runtime_estimate_s
        ends_in_time = (
            estimate is not None
            and reservation.starts_at is not None
            and self.now + estimate <= reservation.starts_at
        )
        if ends_in_time:
            nodes = _choose_nodes(self.rule, job, self.work, self.demand, {})
            if nodes is None:
                self._misfit(job, group, anywhere=True)
        elif self.misfits_outside_holds.cover(group, cpu, memory):
            return False
        else:
            nodes = _choose_nodes(self.rule, job, self.work, self.demand, self._outside_holds())
            if nodes is None:
                self._misfit(job, group, anywhere=False)
        if nodes is None:
            return False
        self._place(job, nodes, backfilled=True, outlives_reservation=not ends_in_time)
        return True

    def _misfit(self, job: JobRequest, group: _Group, *, anywhere: bool) -> None:
        """Remember that `job` did not fit (`anywhere`, or outside what the reservation holds)
        and which other requests of its group cannot."""
        self._learn_misfits(group, (job.millicores_per_node, job.memory_mib_per_node), anywhere)
        self._take_stock()

    def _learn_misfits(self, group: _Group, failed: tuple[int, int], anywhere: bool) -> None:
        """Work out which requests of `group` cannot fit anywhere, and outside the holds;
        `failed` just failed (`anywhere`, or only outside the holds)."""
        only = {group: self.cheapest[group]}
        unfit = _unfit_requests(only, self.work, {})[group]
        if unfit is None:  # a gang: only what failed is known
            unfit = [failed] if anywhere else []
        self.misfits.add(group, unfit)
        self.misfits_outside_holds.add(group, unfit)
        if self.holds:
            unfit = _unfit_requests(only, self.work, self._outside_holds())[group]
            self.misfits_outside_holds.add(group, [failed] if unfit is None else unfit)

    def _learn_all_misfits(self) -> None:
        """Work out at once what each group cannot get, rather than walk the queue to meet its
        jobs: outside the holds, and anywhere for groups with jobs short enough to matter."""
        window = self._window()
        outside = {
            group: least
            for group, least in self.cheapest.items()
            if group not in self.misfits_outside_holds.covered
        }
        anywhere = {
            group: least
            for group, least in outside.items()
            if self.queue._groups[group].shortest() <= window
        }
        if anywhere:
            for group, unfit in _unfit_requests(anywhere, self.work, {}).items():
                self.misfits.add(group, unfit or [])
                self.misfits_outside_holds.add(group, unfit or [])
        if outside:
            unfits = _unfit_requests(outside, self.work, self._outside_holds())
            for group, unfit in unfits.items():
                self.misfits_outside_holds.add(group, unfit or [])

    def _reserve_for(self, job: JobRequest, group: _Group) -> None:
        reserved = _reserve(self.rule, job, self.work, self.now)
        if reserved is None:
            # What the drained cluster cannot hold, a job asking more cannot get either.
            self.stalled_misfits.add(group, [(job.millicores_per_node, job.memory_mib_per_node)])
            usable = self.state._usable
            reason = _shortfall(
                job,
                list(self.state._agents.values()),
                lambda agent: len(usable[agent.agent_id]),
                "GPUs free of foreign processes",
            )
            self.stalled.append(
                Stalled(job.job_id, reason or "cannot start even if every running job ends")
            )
        else:
            self.reservation, self.holds = reserved
            self._learn_all_misfits()
        self._take_stock()

    def _take_stock(self) -> None:
        """After learning what cannot fit: is the pass over, or are short jobs all that may
        still start?"""
        self.finished = self._nothing_fits()
        self.only_short_jobs_can_start = (
            not self.finished
            and self.reservation is not None
            and len(self.misfits_outside_holds.covered) == len(self.groups)
        )

    def _outside_holds(self) -> dict[str, _Free]:
        """What the reserved agents can lend to jobs that run past the reservation's start."""
        if self._outside is None:
            self._outside = {}
            for agent_id, hold in self.holds.items():
                free = self.work.free[agent_id]
                self._outside[agent_id] = _Free(
                    free.gpus - hold.gpus,
                    min(free.millicores, hold.spare_millicores),
                    min(free.memory_mib, hold.spare_memory_mib),
                )
        return self._outside

    def _place(
        self,
        job: JobRequest,
        nodes: tuple[NodeAssignment, ...],
        *,
        backfilled: bool,
        outlives_reservation: bool,
    ) -> None:
        for node in nodes:
            self.work.occupy(job, node, self.now)
            hold = self.holds.get(node.agent_id)
            if hold is not None and outlives_reservation:
                hold.spare_millicores -= job.millicores_per_node
                hold.spare_memory_mib -= job.memory_mib_per_node
        self._outside = None
        self.placements.append(Placement(job, nodes, backfilled))
        charge = self.state.fair_share.expected_charge(job.gpus, job.runtime_estimate_s)
        self.usage[job.project] = self.usage.get(job.project, 0.0) + charge

    def _window(self) -> float:
        """How long a job may run and still end before the reservation starts."""
        starts_at = None if self.reservation is None else self.reservation.starts_at
        return -math.inf if starts_at is None else starts_at - self.now

    def _nothing_fits(self) -> bool:
        """Whether no job left in the queue can start this pass (and which groups are done)."""
        if self.reservation is None:
            # Walk on to find the job that gets the reservation, unless none could get one.
            return len(self.stalled_misfits.covered) == len(self.groups)
        # Only a job that ends before the reservation starts may use what it holds.
        window = self._window()
        covered, outside = self.misfits.covered, self.misfits_outside_holds.covered
        groups = self.queue._groups
        self.done = {
            group
            for group in self.groups
            if group in covered or (group in outside and groups[group].shortest() > window)
        }
        return len(self.done) == len(self.groups)


# --- the policies -------------------------------------------------------------------------------

#: A scheduling policy: one pass over the queue at `now`.
Policy: TypeAlias = Callable[[ClusterState, JobQueue | Iterable[JobRequest], float], Decisions]


def _as_queue(queue: JobQueue | Iterable[JobRequest]) -> JobQueue:
    return queue if isinstance(queue, JobQueue) else JobQueue(queue)


def schedule(
    state: ClusterState,
    queue: JobQueue | Iterable[JobRequest],
    now: float,
    *,
    backfill_depth: int = DEFAULT_BACKFILL_DEPTH,
) -> Decisions:
    """One pass: place what may start now, choosing GPUs that leave the fewest holes."""
    return _Pass(_LEAST_FRAGMENTING, state, _as_queue(queue), now, backfill_depth).run()


def best_fit(
    state: ClusterState,
    queue: JobQueue | Iterable[JobRequest],
    now: float,
    *,
    backfill_depth: int = DEFAULT_BACKFILL_DEPTH,
) -> Decisions:
    """The baseline: as `schedule`, but each node goes where the fewest free GPUs are left."""
    return _Pass(_BEST_FIT, state, _as_queue(queue), now, backfill_depth).run()


def first_fit(
    state: ClusterState,
    queue: JobQueue | Iterable[JobRequest],
    now: float,
    *,
    backfill_depth: int = DEFAULT_BACKFILL_DEPTH,
) -> Decisions:
    """The baseline: as `schedule`, but each node goes to the first agent (by id) with room."""
    return _Pass(_FIRST_FIT, state, _as_queue(queue), now, backfill_depth).run()


def stranded_gpus(state: ClusterState, queue: JobQueue) -> int:
    """Free GPUs that no queued job could use for want of GPUs, CPU or memory beside them.

    Optimistic (each queued size at its cheapest; gangs, capabilities and exclusions ignored),
    and 0 when nothing waits: idle GPUs with an empty queue are not fragmentation.
    """
    if not len(queue):
        return 0
    demand = queue._demand()
    stranded = 0
    for count, agent_ids in state._by_free.items():
        for agent_id in agent_ids if count else ():
            free = state._free[agent_id]
            stranded += demand.unusable(count, free.millicores, free.memory_mib)
    return stranded
