"""Scheduler placement: feasibility, gang placement, order, reservations with backfill, GPU choice,
and the invariants every pass keeps whatever the cluster and queue."""

from __future__ import annotations

import heapq
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from unittest import mock

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from ciuic_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ciuic_scheduler import placement as placement_module
from ciuic_scheduler.fairshare import FairShare, Usage
from ciuic_scheduler.placement import (
    Agent,
    Allocation,
    ClusterState,
    Decisions,
    Gpu,
    JobQueue,
    JobRequest,
    NodeAssignment,
    Placement,
    Policy,
    best_fit,
    feasible,
    first_fit,
    schedule,
    stranded_gpus,
)

GIB = 1024
NVLINK = ((0, 1, 2, 3), (4, 5, 6, 7))
properties = settings(max_examples=150, deadline=None)
POLICIES: list[Policy] = [schedule, best_fit, first_fit]


def agent(
    agent_id: str,
    gpus: int = 8,
    *,
    cpus: int = 64,
    memory_gib: int = 512,
    capabilities: Iterable[str] = ("ddp",),
    groups: tuple[tuple[int, ...], ...] = (),
    busy: Iterable[int] = (),
) -> Agent:
    foreign = set(busy)
    return Agent(
        agent_id,
        tuple(
            Gpu(index, f"GPU-{agent_id}-{index}", busy_foreign=index in foreign)
            for index in range(gpus)
        ),
        millicores=cpus * 1000,
        memory_mib=memory_gib * GIB,
        capabilities=frozenset(capabilities),
        interconnect_groups=groups,
    )


def job(
    job_id: str,
    *,
    project: str = "vision",
    nodes: int = 1,
    gpus: int = 1,
    cpus: float = 0,
    memory_gib: int = 0,
    priority: int = 0,
    capability: str | None = None,
    at: float = 0.0,
    runtime: float | None = None,
    excluded: Iterable[str] = (),
) -> JobRequest:
    return JobRequest(
        job_id,
        project,
        nodes=nodes,
        gpus_per_node=gpus,
        millicores_per_node=int(cpus * 1000),
        memory_mib_per_node=memory_gib * GIB,
        priority=priority,
        capability=capability,
        submitted_at=at,
        runtime_estimate_s=runtime,
        excluded_agents=frozenset(excluded),
    )


def running(
    job_id: str,
    nodes: Mapping[str, Sequence[int]],
    *,
    ends_at: float | None,
    project: str = "vision",
) -> Allocation:
    return Allocation(
        job_id,
        project,
        tuple(NodeAssignment(agent_id, tuple(gpus)) for agent_id, gpus in nodes.items()),
        ends_at=ends_at,
    )


def placed(decisions: Decisions) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    return {
        p.job_id: [(node.agent_id, node.gpus) for node in p.nodes] for p in decisions.placements
    }


def busy_except(agent_id: str, free: Iterable[int], gpus: int = 8) -> dict[str, list[int]]:
    """The nodes of a job that holds every GPU of `agent_id` but `free`."""
    return {agent_id: [index for index in range(gpus) if index not in set(free)]}


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"nodes": 0},
        {"gpus_per_node": -1},
        {"millicores_per_node": -1},
        {"memory_mib_per_node": -1},
        {"runtime_estimate_s": 0.0},
        {"runtime_estimate_s": float("inf")},
    ],
)
def test_a_malformed_job_request_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        JobRequest("j", "vision", **fields)


def test_an_agent_with_overlapping_interconnect_groups_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="interconnect groups"):
        agent("a", 4, groups=((0, 1), (1, 2)))


def test_fair_share_weights_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="share weight of nlp"):
        FairShare({"nlp": 0.0})


# --- feasibility ------------------------------------------------------------------------------


def test_a_shape_some_agents_can_host_is_feasible() -> None:
    assert (
        feasible(job("j", nodes=2, gpus=8, cpus=32, memory_gib=256), [agent("a"), agent("b")])
        is None
    )


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (job("j", gpus=16), "needs 16 GPUs on one node; the largest agent has 8"),
        (job("j", cpus=128), "needs 128 CPUs on one node; the largest agent offers 64 CPUs"),
        (
            job("j", memory_gib=2048),
            "needs 2048 GiB of memory on one node; the largest agent offers 512 GiB",
        ),
        (
            job("j", capability="horovod"),
            "needs the 'horovod' capability, which no registered agent has",
        ),
        (job("j", nodes=3, gpus=8), "needs 3 agents that each offer 8 GPUs; 2 can"),
        (
            job("j", nodes=2, gpus=4, excluded=["a"]),
            "needs 2 agents that each offer 4 GPUs; 1 can "
            "(1 more excluded because this job failed on them)",
        ),
    ],
)
def test_an_impossible_shape_is_rejected_with_the_reason(request_: JobRequest, reason: str) -> None:
    assert feasible(request_, [agent("a"), agent("b")]) == reason


def test_nothing_is_feasible_without_agents() -> None:
    assert feasible(job("j", gpus=0), []) == "no agents are registered"


def test_gpus_busy_with_foreign_processes_still_count_for_feasibility() -> None:
    # The foreign process may end; only the scheduling pass must not use the GPU meanwhile.
    assert feasible(job("j", gpus=8), [agent("a", busy=[3])]) is None


# --- placement basics -------------------------------------------------------------------------


def test_a_single_gpu_job_gets_a_free_gpu() -> None:
    decisions = schedule(ClusterState([agent("a", 2)]), [job("j")], now=0)
    assert placed(decisions) == {"j": [("a", (0,))]}
    assert decisions.reservation is None


def test_a_gang_job_gets_every_node_at_once_on_distinct_agents() -> None:
    state = ClusterState([agent(name) for name in "abcde"])
    decisions = schedule(state, [job("gang", nodes=4, gpus=8)], now=0)
    nodes = placed(decisions)["gang"]
    assert len({agent_id for agent_id, _ in nodes}) == 4
    assert all(len(gpus) == 8 for _, gpus in nodes)


def test_a_gang_job_waits_until_every_node_fits() -> None:
    state = ClusterState(
        [agent(name) for name in "abcd"], [running("r", busy_except("d", []), ends_at=500)]
    )
    decisions = schedule(state, [job("gang", nodes=4, gpus=8)], now=0)
    assert decisions.placements == ()
    assert decisions.reservation is not None
    assert decisions.reservation.starts_at == 500
    assert {node.agent_id for node in decisions.reservation.nodes} == set("abcd")


def test_gpus_busy_with_foreign_processes_are_never_offered() -> None:
    state = ClusterState([agent("a", 4, busy=[0, 1, 2])])
    assert placed(schedule(state, [job("j")], now=0)) == {"j": [("a", (3,))]}
    assert placed(schedule(state, [job("j", gpus=2)], now=0)) == {}


def test_agents_a_job_failed_on_are_not_used_for_it_again() -> None:
    state = ClusterState([agent("a"), agent("b")])
    decisions = schedule(state, [job("retry", gpus=8, excluded=["a"])], now=0)
    assert placed(decisions) == {"retry": [("b", tuple(range(8)))]}


def test_a_job_goes_to_an_agent_with_the_capability_it_needs() -> None:
    state = ClusterState([agent("a", capabilities=["ddp"]), agent("b", capabilities=["horovod"])])
    decisions = schedule(state, [job("j", gpus=8, capability="horovod")], now=0)
    assert placed(decisions) == {"j": [("b", tuple(range(8)))]}


def test_cpu_and_memory_decide_what_fits_beside_the_gpus() -> None:
    state = ClusterState([agent("a", cpus=8, memory_gib=64), agent("b", cpus=64, memory_gib=512)])
    decisions = schedule(
        state, [job("big", gpus=1, cpus=16), job("heavy", gpus=1, memory_gib=128, at=1)], now=0
    )
    assert {nodes[0][0] for nodes in placed(decisions).values()} == {"b"}


def test_a_cpu_only_job_runs_where_it_strands_no_gpus() -> None:
    # Taking agent a's last CPUs would leave its 8 GPUs unusable; b's GPUs are all busy anyway.
    state = ClusterState(
        [agent("a", cpus=8), agent("b", cpus=64)],
        [running("r", busy_except("b", []), ends_at=None)],
    )
    queue = [job("cpu", gpus=0, cpus=8), job("gpu", gpus=1, cpus=4, runtime=10, at=1)]
    assert placed(schedule(state, queue, now=0))["cpu"] == [("b", ())]


# --- order ------------------------------------------------------------------------------------


def test_a_higher_priority_job_is_placed_first() -> None:
    state = ClusterState([agent("a", 1)])
    decisions = schedule(state, [job("low", at=0), job("high", priority=5, at=1)], now=10)
    assert list(placed(decisions)) == ["high"]


def test_jobs_of_a_project_start_in_submission_order() -> None:
    state = ClusterState([agent("a", 2)])
    queue = [job("third", at=3), job("first", at=1), job("second", at=2)]
    assert list(placed(schedule(state, queue, now=10))) == ["first", "second"]


def test_the_project_furthest_below_its_share_goes_first() -> None:
    state = ClusterState(
        [agent("a", 1)],
        fair_share=FairShare({"vision": 3, "nlp": 1}),
        usage={"vision": 2000, "nlp": 1000},
        usage_as_of=0,
    )
    # vision: 2000 / 3 < nlp: 1000 / 1, so vision is further below its share.
    queue = [job("nlp-job", project="nlp", at=0), job("vision-job", project="vision", at=5)]
    assert list(placed(schedule(state, queue, now=0))) == ["vision-job"]


def test_one_pass_splits_free_gpus_between_projects_by_weight() -> None:
    state = ClusterState([agent("a", 8)], fair_share=FairShare({"vision": 3, "nlp": 1}))
    queue = [
        job(f"{project}-{n}", project=project, at=n, runtime=600)
        for project in ("vision", "nlp")
        for n in range(8)
    ]
    counts = Counter(p.job.project for p in schedule(state, queue, now=0).placements)
    assert counts == {"vision": 6, "nlp": 2}


# --- reservation and backfill -----------------------------------------------------------------


def test_the_head_job_is_reserved_where_running_jobs_end_first() -> None:
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("r1", busy_except("a", []), ends_at=900),
            running("r2", busy_except("b", []), ends_at=300),
        ],
    )
    decisions = schedule(state, [job("head", gpus=8)], now=0)
    assert decisions.reservation is not None
    assert decisions.reservation.job_id == "head"
    assert decisions.reservation.starts_at == 300
    assert decisions.reservation.nodes == (NodeAssignment("b", tuple(range(8))),)


def backfill_cluster() -> ClusterState:
    """Agent a: 4 GPUs free, the other 4 free at t=100. Agent b: busy until t=1000."""
    return ClusterState(
        [agent("a"), agent("b")],
        [
            running("r1", busy_except("a", [0, 1, 2, 3]), ends_at=100),
            running("r2", busy_except("b", []), ends_at=1000),
        ],
    )


def test_a_short_job_is_backfilled_when_it_ends_before_the_reservation() -> None:
    decisions = schedule(
        backfill_cluster(), [job("head", gpus=8), job("short", gpus=2, at=1, runtime=60)], now=0
    )
    assert decisions.reservation is not None
    assert decisions.reservation.starts_at == 100
    assert [(p.job_id, p.backfilled) for p in decisions.placements] == [("short", True)]


@pytest.mark.parametrize("runtime", [600.0, None])
def test_a_job_that_may_outlast_the_reservation_is_not_backfilled_onto_it(
    runtime: float | None,
) -> None:
    decisions = schedule(
        backfill_cluster(), [job("head", gpus=8), job("long", gpus=2, at=1, runtime=runtime)], now=0
    )
    assert decisions.placements == ()


def test_a_long_job_is_backfilled_on_what_the_reservation_does_not_need() -> None:
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("r1", busy_except("a", [0, 1, 2, 3]), ends_at=100),
            running("r2", busy_except("b", [7]), ends_at=1000),
        ],
    )
    decisions = schedule(state, [job("head", gpus=8), job("long", gpus=1, at=1)], now=0)
    assert placed(decisions) == {"long": [("b", (7,))]}


def test_backfill_leaves_the_reservation_the_cpu_and_memory_it_needs() -> None:
    # At t=100 the head gets GPUs 0-1 and 56 of agent a's 64 CPUs: of the GPUs free now, 2-3
    # are spare, but only 8 CPUs beside them.
    state = ClusterState(
        [agent("a", cpus=64)],
        [
            Allocation(
                "r",
                "vision",
                (NodeAssignment("a", (4, 5, 6, 7)),),
                millicores_per_node=32_000,
                ends_at=100,
            )
        ],
    )
    head = job("head", gpus=2, cpus=56)
    greedy = schedule(state, [head, job("greedy", gpus=1, cpus=16, at=1)], now=0)
    assert greedy.reservation is not None
    assert greedy.reservation.nodes == (NodeAssignment("a", (0, 1)),)
    assert greedy.placements == ()
    modest = [job(f"modest-{n}", gpus=1, cpus=8, at=1 + n) for n in range(2)]
    # The spare 8 CPUs go to one of them only.
    assert placed(schedule(state, [head, *modest], now=0)) == {"modest-0": [("a", (2,))]}


def test_a_short_job_backfills_onto_reserved_gpus_after_a_long_one_like_it_was_refused() -> None:
    state = ClusterState([agent("a")], [running("r", busy_except("a", [0, 1, 2, 3]), ends_at=100)])
    queue = [job("head", gpus=8), job("long", gpus=1, at=1), job("short", gpus=1, at=2, runtime=20)]
    assert placed(schedule(state, queue, now=0)) == {"short": [("a", (0,))]}


def test_a_short_gang_backfills_onto_reserved_gpus_after_a_long_one_like_it_was_refused() -> None:
    state = ClusterState(
        [agent("a"), agent("b"), agent("c")],
        [
            running("ra", busy_except("a", [0, 1, 2, 3]), ends_at=100),
            running("rb", busy_except("b", [0, 1, 2, 3]), ends_at=100),
            running("rc", busy_except("c", []), ends_at=None),
        ],
    )
    queue = [
        job("head", nodes=2, gpus=8),
        job("long", nodes=2, gpus=2, at=1),
        job("short", nodes=2, gpus=2, at=2, runtime=20),
    ]
    assert placed(schedule(state, queue, now=0)) == {"short": [("a", (0, 1)), ("b", (0, 1))]}


def test_a_job_asking_less_of_one_resource_fits_where_a_bigger_one_did_not() -> None:
    # Agent a has CPU to spare but little memory, b the other way round; c is busy.
    state = ClusterState(
        [agent("a", cpus=32, memory_gib=128), agent("b", cpus=16, memory_gib=512), agent("c")],
        [running("rc", busy_except("c", []), ends_at=None)],
    )
    queue = [
        job("both", cpus=32, memory_gib=256),
        job("less-cpu", cpus=16, memory_gib=256, at=1),
        job("less-memory", cpus=32, memory_gib=128, at=2),
    ]
    decisions = schedule(state, queue, now=0)
    assert placed(decisions) == {"less-cpu": [("b", (0,))], "less-memory": [("a", (0,))]}
    assert decisions.reservation is not None
    assert decisions.reservation.job_id == "both"


def test_a_reservation_behind_a_job_of_unknown_length_has_no_start_time() -> None:
    state = ClusterState([agent("a")], [running("r", busy_except("a", [0, 1]), ends_at=None)])
    decisions = schedule(state, [job("head", gpus=8), job("short", gpus=2, at=1, runtime=1)], now=0)
    assert decisions.reservation is not None
    assert decisions.reservation.starts_at is None
    # Nothing is known to end before it, so even a short job may not take its GPUs.
    assert decisions.placements == ()


def test_a_job_that_cannot_start_even_on_an_idle_cluster_does_not_block_the_queue() -> None:
    state = ClusterState([agent("a", busy=[7]), agent("b", busy=[7])])
    decisions = schedule(
        state, [job("whole", gpus=8), job("next", gpus=7, at=1, runtime=10_000)], now=0
    )
    assert [stall.job_id for stall in decisions.stalled] == ["whole"]
    assert "GPUs free of foreign processes" in decisions.stalled[0].reason
    assert list(placed(decisions)) == ["next"]
    assert decisions.reservation is None


# --- GPU choice -------------------------------------------------------------------------------


def test_a_job_goes_where_it_leaves_no_hole_for_the_queued_sizes() -> None:
    # The queue wants 3s and 4s. On a (4 free) a 3-GPU job would leave 1 GPU nobody can use; on
    # b (6 free) it leaves 3, which another 3 can use. Best fit takes a.
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("ra", busy_except("a", [4, 5, 6, 7]), ends_at=None),
            running("rb", busy_except("b", [2, 3, 4, 5, 6, 7]), ends_at=None),
        ],
    )
    queue = [job("three", gpus=3, runtime=60), job("four", gpus=4, at=1, runtime=60)]
    assert placed(schedule(state, queue, now=0)) == {
        "three": [("b", (2, 3, 4))],
        "four": [("a", (4, 5, 6, 7))],
    }
    assert placed(best_fit(state, queue, now=0))["three"] == [("a", (4, 5, 6))]


def test_a_job_avoids_leaving_gpus_without_the_memory_to_use_them() -> None:
    # Queued 2-GPU jobs need at least 200 GiB. On a, the first would leave 2 GPUs beside 100 GiB,
    # which no queued job can use; on b enough memory stays. Best fit takes a.
    state = ClusterState(
        [agent("a", memory_gib=400), agent("b", memory_gib=1024)],
        [
            running("ra", busy_except("a", [0, 1, 2, 3]), ends_at=None),
            running("rb", busy_except("b", [0, 1, 2, 3, 4, 5]), ends_at=None),
        ],
    )
    queue = [
        job("j", gpus=2, memory_gib=300, runtime=60),
        job("k", gpus=2, memory_gib=200, at=1, runtime=60),
    ]
    assert placed(schedule(state, queue, now=0))["j"][0][0] == "b"
    assert placed(best_fit(state, queue, now=0))["j"][0][0] == "a"


def test_a_job_joins_the_agent_whose_jobs_end_after_it() -> None:
    # Both agents have 4 GPUs free. On a, a 500 s job would keep the agent partly busy for 400 s
    # after its other job ends; on b it ends before b's job does, so b frees whole at t=1000.
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("ra", busy_except("a", [4, 5, 6, 7]), ends_at=100),
            running("rb", busy_except("b", [4, 5, 6, 7]), ends_at=1000),
        ],
    )
    queue = [job("j", gpus=4, runtime=500)]
    assert placed(schedule(state, queue, now=0)) == {"j": [("b", (4, 5, 6, 7))]}
    assert placed(best_fit(state, queue, now=0)) == {"j": [("a", (4, 5, 6, 7))]}


def test_a_job_that_outlives_every_agent_goes_where_it_delays_the_end_least() -> None:
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("ra", busy_except("a", [4, 5, 6, 7]), ends_at=100),
            running("rb", busy_except("b", [4, 5, 6, 7]), ends_at=300),
        ],
    )
    decisions = schedule(state, [job("j", gpus=4, runtime=1000)], now=0)
    assert placed(decisions) == {"j": [("b", (4, 5, 6, 7))]}


def test_jobs_of_unknown_length_gather_where_one_already_runs() -> None:
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("ra", busy_except("a", [4, 5, 6, 7]), ends_at=100),
            running("rb", busy_except("b", [4, 5, 6, 7]), ends_at=None),
        ],
    )
    assert placed(schedule(state, [job("j", gpus=4)], now=0)) == {"j": [("b", (4, 5, 6, 7))]}


def test_fit_goes_before_when_jobs_end() -> None:
    # b's job ends later, but the job would leave 2 GPUs free there rather than none on a.
    state = ClusterState(
        [agent("a"), agent("b")],
        [
            running("ra", busy_except("a", [4, 5, 6, 7]), ends_at=100),
            running("rb", {"b": [0, 1]}, ends_at=1000),
        ],
    )
    queue = [job("j", gpus=4, runtime=500), job("k", gpus=1, at=1, runtime=500)]
    assert placed(schedule(state, queue, now=0))["j"] == [("a", (4, 5, 6, 7))]


def test_jobs_placed_earlier_in_a_pass_count_for_when_an_agent_frees() -> None:
    # The first job opens agent a and runs 1000 s; the second, shorter, joins it rather than
    # opening b, though both leave the same GPUs free.
    state = ClusterState([agent("a"), agent("b")])
    queue = [job("long", gpus=4, runtime=1000), job("short", gpus=2, at=1, runtime=100)]
    assert placed(schedule(state, queue, now=0)) == {
        "long": [("a", (0, 1, 2, 3))],
        "short": [("a", (4, 5))],
    }


def test_a_job_is_placed_within_one_nvlink_group() -> None:
    state = ClusterState([agent("a", groups=NVLINK)], [running("r", {"a": [0]}, ends_at=None)])
    assert placed(schedule(state, [job("j", gpus=4)], now=0)) == {"j": [("a", (4, 5, 6, 7))]}
    assert placed(best_fit(state, [job("j", gpus=4)], now=0)) == {"j": [("a", (1, 2, 3, 4))]}


def test_an_agent_whose_free_gpus_share_a_group_is_preferred() -> None:
    state = ClusterState(
        [agent("a", groups=NVLINK), agent("b", groups=NVLINK)],
        [
            running("ra", {"a": [2, 3, 6, 7]}, ends_at=None),
            running("rb", {"b": [0, 1, 2, 3]}, ends_at=None),
        ],
    )
    assert placed(schedule(state, [job("j", gpus=4)], now=0)) == {"j": [("b", (4, 5, 6, 7))]}


def test_across_agents_a_tighter_fit_outranks_staying_in_one_nvlink_group() -> None:
    # a: 4 free split 2+2 across groups, filled exactly; b: 6 free, 4 of them in one group.
    # Leaving b's 6 whole packs better than keeping this job in one group (bench/placement.py).
    state = ClusterState(
        [agent("a", groups=NVLINK), agent("b", groups=NVLINK)],
        [
            running("ra", {"a": [2, 3, 6, 7]}, ends_at=None),
            running("rb", {"b": [0, 1]}, ends_at=None),
        ],
    )
    assert placed(schedule(state, [job("j", gpus=4)], now=0)) == {"j": [("a", (0, 1, 4, 5))]}


def test_a_small_job_takes_the_fullest_group_and_keeps_a_whole_group_free() -> None:
    state = ClusterState([agent("a", groups=NVLINK)], [running("r", {"a": [0, 1]}, ends_at=None)])
    assert placed(schedule(state, [job("j", gpus=2)], now=0)) == {"j": [("a", (2, 3))]}


def test_best_fit_takes_the_agent_left_with_the_fewest_free_gpus() -> None:
    state = ClusterState(
        [agent("a"), agent("b")], [running("r", {"b": [0, 1, 2, 3, 4]}, ends_at=None)]
    )
    assert placed(best_fit(state, [job("j", gpus=2)], now=0))["j"][0][0] == "b"
    assert placed(first_fit(state, [job("j", gpus=2)], now=0))["j"][0][0] == "a"


def test_equal_candidates_are_broken_by_agent_id() -> None:
    state = ClusterState([agent(name) for name in "dcba"])
    for policy in POLICIES:
        assert placed(policy(state, [job("j", gpus=2)], 0)) == {"j": [("a", (0, 1))]}


# --- cluster state, queue and usage -----------------------------------------------------------


def test_the_cluster_refuses_to_give_a_gpu_twice() -> None:
    state = ClusterState([agent("a")], [running("r", {"a": [0, 1]}, ends_at=None)])
    with pytest.raises(FailedPrecondition, match=r"GPUs \[1\] of agent a are not free"):
        state.start([Placement(job("j", gpus=2), (NodeAssignment("a", (1, 2)),))], now=0)
    with pytest.raises(FailedPrecondition, match="not free"):
        state.start(
            [Placement(job(name), (NodeAssignment("a", (5,)),)) for name in ("x", "y")], now=0
        )
    assert state.free_gpus("a") == frozenset(range(2, 8))  # all or nothing


def test_finishing_a_job_gives_its_gpus_cpu_and_memory_back() -> None:
    state = ClusterState([agent("a", cpus=8)])
    state.start(schedule(state, [job("j", gpus=8, cpus=8)], now=0).placements, now=0)
    assert state.free_gpus("a") == frozenset()
    assert state.finish("j", now=10).job_id == "j"
    assert state.free_gpus("a") == frozenset(range(8))
    assert placed(schedule(state, [job("k", gpus=8, cpus=8)], now=10)) == {
        "k": [("a", tuple(range(8)))]
    }
    with pytest.raises(NotFound):
        state.finish("j", now=11)


def test_an_agent_with_running_jobs_cannot_be_removed() -> None:
    state = ClusterState([agent("a")], [running("r", {"a": [0]}, ends_at=None)])
    with pytest.raises(FailedPrecondition, match=r"still runs jobs \['r'\]"):
        state.remove_agent("a")
    state.finish("r", now=1)
    state.remove_agent("a")
    assert "a" not in state.agents


def test_a_refreshed_agent_report_hides_gpus_taken_by_foreign_processes() -> None:
    state = ClusterState([agent("a", 2)])
    state.register(agent("a", 2, busy=[0]))
    assert state.free_gpus("a") == frozenset({1})
    assert state.usable_gpus == 1


def test_a_job_is_queued_once() -> None:
    queue = JobQueue([job("j")])
    with pytest.raises(AlreadyExists):
        queue.add(job("j"))
    assert queue.remove("j").job_id == "j"
    assert len(queue) == 0


def test_the_queue_lists_jobs_by_priority_then_submission() -> None:
    queue = JobQueue(
        [job("b", at=2), job("urgent", priority=1, at=9), job("a", project="nlp", at=1)]
    )
    assert [j.job_id for j in queue] == ["urgent", "a", "b"]


def test_usage_halves_every_half_life_and_accrues_while_running() -> None:
    share = FairShare(half_life_s=100)
    assert Usage(800.0, 0, as_of=0).at(200, share) == pytest.approx(200.0)
    # 2 GPUs for one half-life: integral of 2 * 2**(-(100 - t)/100) dt over [0, 100]
    assert Usage(0.0, 2, as_of=0).at(100, share) == pytest.approx(
        2 * 100 / 0.6931471805599453 * 0.5
    )


def test_stranded_gpus_are_free_gpus_no_queued_job_can_use() -> None:
    state = ClusterState(
        [agent("a"), agent("b")], [running("ra", busy_except("a", [0, 1, 2]), ends_at=None)]
    )
    assert stranded_gpus(state, JobQueue([job("j", gpus=4)])) == 3  # b's 8 can take two 4s
    assert stranded_gpus(state, JobQueue([job("j", gpus=1)])) == 0
    assert stranded_gpus(state, JobQueue()) == 0


def test_stranded_gpus_follow_the_queue_as_jobs_come_and_go() -> None:
    # One GPU free beside 4 CPUs: a 2-CPU job could use it, a 6-CPU job could not.
    state = ClusterState(
        [agent("a", cpus=8)],
        [
            Allocation(
                "r",
                "vision",
                (NodeAssignment("a", (1, 2, 3, 4, 5, 6, 7)),),
                millicores_per_node=4000,
            )
        ],
    )
    queue = JobQueue([job("small", cpus=2), job("big", cpus=6, at=1)])
    assert stranded_gpus(state, queue) == 0
    queue.remove("small")
    assert stranded_gpus(state, queue) == 1
    queue.add(job("small-again", cpus=2, at=2))
    assert stranded_gpus(state, queue) == 0
    queue.add(job("another", cpus=1, at=3))
    queue.remove("another")
    queue.remove("small-again")
    assert stranded_gpus(state, queue) == 1


# --- properties -------------------------------------------------------------------------------


@st.composite
def agents(draw: st.DrawFn, count: int | None = None) -> list[Agent]:
    total = count if count is not None else draw(st.integers(1, 5))
    fleet = []
    for number in range(total):
        gpus = draw(st.sampled_from([0, 2, 4, 8, 8, 8]))
        groups = NVLINK if gpus == 8 and draw(st.booleans()) else ()
        busy = draw(st.sets(st.integers(0, gpus - 1), max_size=2)) if gpus else set()
        fleet.append(
            agent(
                f"a{number}",
                gpus,
                cpus=draw(st.sampled_from([16, 32, 64])),
                memory_gib=draw(st.sampled_from([128, 512])),
                capabilities=["ddp"] if draw(st.integers(0, 3)) else [],
                groups=groups,
                busy=busy if draw(st.integers(0, 4)) == 0 else (),
            )
        )
    return fleet


@st.composite
def requests(
    draw: st.DrawFn, agent_ids: Sequence[str], prefix: str, count: int
) -> list[JobRequest]:
    """Jobs of few shapes (so that like jobs meet), some impossible, some retried elsewhere."""
    jobs = []
    for number in range(count):
        retried = agent_ids and draw(st.integers(0, 6)) == 0
        jobs.append(
            job(
                f"{prefix}{number}",
                project=draw(st.sampled_from(["vision", "nlp"])),
                nodes=draw(st.sampled_from([1, 1, 1, 2, 3])),
                gpus=draw(st.sampled_from([0, 1, 1, 2, 2, 4, 8, 9])),
                cpus=draw(st.sampled_from([0, 4, 8, 16, 32])),
                memory_gib=draw(st.sampled_from([0, 64, 128, 256])),
                priority=draw(st.sampled_from([0, 0, 0, 1, 2])),
                capability=draw(st.sampled_from([None, None, None, "ddp", "horovod"])),
                at=float(draw(st.integers(0, 50))),
                runtime=draw(st.sampled_from([None, 5.0, 20.0, 60.0, 300.0, 1000.0])),
                excluded=[draw(st.sampled_from(agent_ids))] if retried else (),
            )
        )
    return jobs


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ClusterState, list[JobRequest], Policy]:
    """A cluster partly taken by earlier jobs (most with known ends), a queue, and a policy."""
    fleet = draw(agents())
    ids = [a.agent_id for a in fleet]
    state = ClusterState(fleet, fair_share=FairShare({"vision": draw(st.sampled_from([1, 3]))}))
    earlier = draw(requests(ids, "old", draw(st.integers(0, 8))))
    state.start(schedule(state, earlier, now=0).placements, now=0)
    queue = draw(requests(ids, "job", draw(st.integers(0, 16))))
    return state, queue, draw(st.sampled_from(POLICIES))


@properties
@given(scenarios())
def test_no_gpu_is_ever_assigned_twice_or_while_busy(
    scenario: tuple[ClusterState, list[JobRequest], Policy],
) -> None:
    state, queue, policy = scenario
    taken = Counter(
        (node.agent_id, gpu)
        for allocation in state.allocations.values()
        for node in allocation.nodes
        for gpu in node.gpus
    )
    for placement in policy(state, queue, 10.0).placements:
        for node in placement.nodes:
            assert set(node.gpus) <= state.free_gpus(node.agent_id)
            taken.update((node.agent_id, gpu) for gpu in node.gpus)
    assert all(count == 1 for count in taken.values())


@properties
@given(scenarios())
def test_gang_jobs_get_all_their_nodes_or_none(
    scenario: tuple[ClusterState, list[JobRequest], Policy],
) -> None:
    state, queue, policy = scenario
    for placement in policy(state, queue, 10.0).placements:
        agent_ids = [node.agent_id for node in placement.nodes]
        assert len(agent_ids) == placement.job.nodes
        assert len(set(agent_ids)) == len(agent_ids)
        assert all(len(node.gpus) == placement.job.gpus_per_node for node in placement.nodes)


@properties
@given(scenarios())
def test_placements_respect_every_constraint_of_the_job_and_agent(
    scenario: tuple[ClusterState, list[JobRequest], Policy],
) -> None:
    state, queue, policy = scenario
    decisions = policy(state, queue, 10.0)
    for placement in decisions.placements:
        request = placement.job
        assert feasible(request, state.agents.values()) is None
        for node in placement.nodes:
            host = state.agents[node.agent_id]
            assert node.agent_id not in request.excluded_agents
            assert request.capability is None or request.capability in host.capabilities
            busy = {gpu.index for gpu in host.gpus if gpu.busy_foreign}
            assert not busy & set(node.gpus)
    state.start(decisions.placements, now=10.0)  # refuses any GPU, CPU or memory given twice


@properties
@given(scenarios())
def test_impossible_shapes_are_never_placed(
    scenario: tuple[ClusterState, list[JobRequest], Policy],
) -> None:
    state, queue, policy = scenario
    impossible = {r.job_id for r in queue if feasible(r, state.agents.values()) is not None}
    decisions = policy(state, queue, 10.0)
    assert not impossible & {p.job_id for p in decisions.placements}
    if decisions.reservation is not None:
        assert decisions.reservation.job_id not in impossible


@properties
@given(scenarios(), st.sampled_from([1, 64]))
def test_a_pass_leaves_no_job_waiting_that_could_start(
    scenario: tuple[ClusterState, list[JobRequest], Policy], breadth: int
) -> None:
    state, queue, policy = scenario
    # A narrow search breadth makes the shortcuts a pass takes on large clusters run here too.
    with mock.patch.object(placement_module, "_SEARCH_BREADTH", breadth):
        decisions = policy(state, queue, 10.0)
    state.start(decisions.placements, now=10.0)
    reservation = decisions.reservation
    started = {p.job_id for p in decisions.placements}
    for request in queue:
        if request.job_id in started:
            continue
        if reservation is not None:
            # Behind a reservation, only a job known to end before it may take anything free.
            estimate, starts_at = request.runtime_estimate_s, reservation.starts_at
            if estimate is None or starts_at is None or 10.0 + estimate > starts_at:
                continue
        assert policy(state, [request], 10.0).placements == (), f"{request.job_id} could start"


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_same_cluster_and_queue_give_the_same_decisions(
    scenario: tuple[ClusterState, list[JobRequest], Policy], rng: random.Random
) -> None:
    state, queue, policy = scenario
    shuffled_agents = list(state.agents.values())
    rng.shuffle(shuffled_agents)
    shuffled_allocations = list(state.allocations.values())
    rng.shuffle(shuffled_allocations)
    twin = ClusterState(
        shuffled_agents, shuffled_allocations, fair_share=state.fair_share, usage=state.usage(0.0)
    )
    shuffled_queue = list(queue)
    rng.shuffle(shuffled_queue)
    assert policy(state, queue, 10.0) == policy(twin, shuffled_queue, 10.0)
    assert policy(state, queue, 10.0) == policy(state, queue, 10.0)


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.data())
def test_a_queue_changed_job_by_job_decides_as_a_fresh_one(
    scenario: tuple[ClusterState, list[JobRequest], Policy], data: st.DataObject
) -> None:
    state, jobs, policy = scenario
    # Queue the jobs, take some out again (placed or cancelled) and put a few back, asking a
    # pass in between, as the scheduler does; then compare with a queue built afresh.
    queue = JobQueue()
    for request in jobs:
        queue.add(request)
        policy(state, queue, 10.0)
    taken = data.draw(st.lists(st.sampled_from(jobs), unique_by=lambda j: j.job_id)) if jobs else []
    for request in taken:
        queue.remove(request.job_id)
        policy(state, queue, 10.0)
        if data.draw(st.booleans()):
            queue.add(request)
    assert policy(state, queue, 10.0) == policy(state, JobQueue(list(queue)), 10.0)
    assert stranded_gpus(state, queue) == stranded_gpus(state, JobQueue(list(queue)))


def simulate(
    state: ClusterState, queue: JobQueue, policy: Policy, until: float, runtimes: dict[str, float]
) -> tuple[dict[str, float], list[Decisions], dict[str, float]]:
    """Run passes at every completion until `until`; jobs run for `runtimes`. Returns each job's
    start, every pass's decisions, and each project's GPU-seconds (clipped at `until`)."""
    starts: dict[str, float] = {}
    passes = []
    gpu_seconds: dict[str, float] = defaultdict(float)
    ends: list[tuple[float, str]] = []
    now = 0.0
    while now <= until:
        decisions = policy(state, queue, now)
        passes.append(decisions)
        state.start(decisions.placements, now)
        for placement in decisions.placements:
            queue.remove(placement.job_id)
            starts[placement.job_id] = now
            end = now + runtimes[placement.job_id]
            heapq.heappush(ends, (end, placement.job_id))
            gpu_seconds[placement.job.project] += placement.job.gpus * (min(end, until) - now)
        if not ends:
            break
        now = ends[0][0]
        while ends and ends[0][0] == now:
            state.finish(heapq.heappop(ends)[1], now)
    return starts, passes, gpu_seconds


@st.composite
def busy_traces(draw: st.DrawFn) -> tuple[list[Agent], list[JobRequest]]:
    """A small cluster and a queue of big and small jobs, each with an honoured runtime."""
    fleet = [
        agent(f"a{number}", draw(st.sampled_from([4, 8])), cpus=32, groups=())
        for number in range(draw(st.integers(2, 4)))
    ]
    jobs = [
        job(
            f"job{number:02d}",
            nodes=draw(st.sampled_from([1, 1, 1, 2])),
            gpus=draw(st.sampled_from([1, 2, 4, 4, 8])),
            cpus=draw(st.sampled_from([0, 4, 16, 32])),
            priority=draw(st.integers(0, 1)),
            at=float(number),
            runtime=float(draw(st.integers(1, 100)) * 10),
        )
        for number in range(draw(st.integers(4, 20)))
    ]
    return fleet, [j for j in jobs if feasible(j, fleet) is None]


@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(busy_traces(), st.sampled_from(POLICIES))
def test_backfill_never_delays_the_reserved_job(
    trace: tuple[list[Agent], list[JobRequest]], policy: Policy
) -> None:
    fleet, jobs = trace
    # Runtimes are exactly the estimates, and one project keeps the queue order fixed, so the
    # reserved job stays the head until it starts.
    runtimes = {j.job_id: j.runtime_estimate_s or 0.0 for j in jobs}
    starts, passes, _ = simulate(ClusterState(fleet), JobQueue(jobs), policy, 1e9, runtimes)
    assert set(starts) == set(runtimes)
    promised: dict[str, float] = {}
    for decisions in passes:
        reservation = decisions.reservation
        if reservation is not None and reservation.starts_at is not None:
            promised.setdefault(reservation.job_id, reservation.starts_at)
    for job_id, starts_by in promised.items():
        assert starts[job_id] <= starts_by, f"{job_id} was promised {starts_by}"


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(st.integers(0, 2**32 - 1))
def test_fair_share_converges_to_the_weights_on_a_long_trace(seed: int) -> None:
    rng = random.Random(seed)
    share = FairShare({"vision": 3, "nlp": 1}, half_life_s=1000)
    state = ClusterState([agent("a"), agent("b")], fair_share=share)
    jobs = []
    runtimes = {}
    for number in range(2000):  # more than the trace can run: both projects always wait
        project = "vision" if number % 2 else "nlp"
        runtime = rng.uniform(20, 200)
        request = job(
            f"{project}-{number}",
            project=project,
            gpus=rng.choice([1, 2, 4]),
            at=number,
            runtime=runtime,
        )
        jobs.append(request)
        runtimes[request.job_id] = runtime
    _, _, gpu_seconds = simulate(state, JobQueue(jobs), schedule, 10_000, runtimes)
    assert gpu_seconds["vision"] / gpu_seconds["nlp"] == pytest.approx(3.0, rel=0.10)
