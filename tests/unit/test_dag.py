"""A pipeline as a DAG of stages and jobs, and how a run moves through it (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciuic_common.pipeline import load_pipeline
from ciuic_scheduler.dag import (
    StageView,
    blocked,
    evaluate_gates,
    needs_baseline,
    outcome,
    plan_run,
    ready,
)

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "examples" / "seed" / ".ciuicci.yaml").read_text()


def test_the_seed_becomes_setup_training_validation_packaging_deployment() -> None:
    plan = plan_run(load_pipeline(SEED))
    assert [(s.name, s.kind, s.needs) for s in plan.stages] == [
        ("setup", "job", ()),
        ("training", "training", ("setup",)),
        ("quick-check", "validation", ("training",)),
        ("thorough-eval", "validation", ("quick-check",)),
        ("packaging", "packaging", ("thorough-eval",)),
        ("deployment", "deployment", ("packaging",)),
    ]
    assert plan.trials == 9
    trial = next(j for j in plan.jobs if j.kind == "trial")
    assert (trial.nodes, trial.gpus_per_node, trial.capability) == (4, 8, "horovod")
    assert plan.stage("quick-check").timeout_s == 30 * 60
    assert plan.stage("packaging").service == "packager"
    assert plan.stage("deployment").service == "traffic_router"
    setup = next(j for j in plan.jobs if j.kind == "job")
    assert setup.steps[0]["run"] == "pip install -r requirements.txt"
    assert setup.steps[1]["cache"]["paths"] == ["/root/.cache/pip"]
    # Training and evaluation run in the environment the setup job cached.
    assert trial.steps == (setup.steps[1], {"run": "python train.py"})
    evaluation = next(j for j in plan.jobs if j.kind == "validation")
    assert evaluation.steps == (setup.steps[1], {"run": "python evaluate.py"})


def test_jobs_come_after_what_they_need_and_data_after_every_job() -> None:
    plan = plan_run(
        load_pipeline(
            """
jobs:
  test: {needs: build, steps: [{run: make test}]}
  build: {steps: [{run: make}]}
data:
  corpus: s3://bucket/corpus/
training:
  command: python train.py
"""
        )
    )
    assert [(s.name, s.needs) for s in plan.stages] == [
        ("build", ()),
        ("test", ("build",)),
        ("data", ("test", "build")),
        ("training", ("data",)),
    ]
    assert plan.stage("data").service == "data_versioner"
    assert set(plan.stage("data").inputs["datasets"]) == {"corpus"}


def test_a_job_named_like_a_platform_stage_keeps_its_name() -> None:
    plan = plan_run(load_pipeline("jobs:\n  training: {steps: [{run: echo}]}\ntraining: {}\n"))
    assert [s.name for s in plan.stages] == ["training", "training:training"]


def test_ready_needs_every_dependency_succeeded() -> None:
    stages = [
        StageView("a", "succeeded"),
        StageView("b", "running", ("a",)),
        StageView("c", "pending", ("a",)),
        StageView("d", "pending", ("a", "b")),
    ]
    assert ready(stages) == ["c"]


def test_a_failure_blocks_its_dependents_with_the_cause() -> None:
    stages = [
        StageView("setup", "failed", reason="setup failed: node 0 on a1 (exit 1)"),
        StageView("training", "pending", ("setup",)),
    ]
    assert blocked(stages) == [
        ("training", "needs setup, which failed: setup failed: node 0 on a1 (exit 1)")
    ]


def test_a_run_ends_only_when_every_stage_has() -> None:
    assert outcome([StageView("a", "succeeded"), StageView("b", "waiting")]) is None
    assert outcome([StageView("a", "succeeded")]) == ("succeeded", None)
    assert outcome([StageView("a", "failed", reason="boom"), StageView("b", "failed")]) == (
        "failed",
        "a: boom",
    )


def test_gates_pass_and_fail_with_the_numbers() -> None:
    metrics = {"accuracy": {"last": 0.93, "max": 0.95}, "loss": {"last": 0.2}}
    passed, failed = evaluate_gates(["accuracy >= 0.9", "loss < 0.1"], metrics)
    assert passed.passed
    assert "accuracy=0.93" in passed.detail
    assert not failed.passed
    assert "loss=0.2" in failed.detail


def test_a_gate_on_a_metric_never_logged_fails_and_says_so() -> None:
    (result,) = evaluate_gates(["f1 > 0.5"], {"accuracy": {"last": 1.0}})
    assert not result.passed
    assert "f1 not logged" in result.detail


@pytest.mark.parametrize(
    ("gate", "baseline", "passes"),
    [
        ("accuracy >= baseline - 0.01", {"accuracy": 0.935}, True),
        ("accuracy >= baseline - 0.01", {"accuracy": 0.95}, False),
        ("loss <= baseline.loss", {"loss": 0.3}, True),
    ],
)
def test_gates_against_a_baseline(gate: str, baseline: dict[str, float], passes: bool) -> None:
    assert needs_baseline(gate)
    metrics = {"accuracy": {"last": 0.93}, "loss": {"last": 0.2}}
    (result,) = evaluate_gates([gate], metrics, baseline)
    assert result.passed is passes
