"""The pipeline file: the seed validates as written, every mistake is found at its line and
column with a message a person can act on, and a validated spec survives the bus (JSON)."""

from __future__ import annotations

import copy
import json
import pickle
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_common.errors import InvalidArgument
from ciuic_common.events import SpecIssue
from ciuic_common.pipeline import (
    DEFAULT_EVALUATION_COMMAND,
    DEFAULT_TRAINING_COMMAND,
    MAX_TRIALS,
    AlertRule,
    CacheStep,
    Duration,
    EmailAction,
    Pipeline,
    PipelineSpecError,
    RangeParameter,
    RunStep,
    StopTrainingAction,
    ValuesParameter,
    data_env_name,
    format_byte_size,
    format_percentage,
    job_order,
    load_pipeline,
    parse_byte_size,
    parse_duration,
    parse_percentage,
    summarize,
)

SHARED_SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "seed-pipeline.yaml"

# The seed pipeline, verbatim (shared/seed/seed-pipeline.yaml), so the suite runs on any clone.
SEED = """\
# The article's YAML fragments, put together into one .ciuicci.yaml.
# Keys and values are as the article writes them; `threshold` is given a value, since the article
# leaves it open, and `learning_rate`/`batch_size` keep the article's lists.
triggers:
  - type: git-push
    branches:
      - main
    paths:
      - "deepseek/**"
      - "requirements.txt"

jobs:
  setup:
    container: nvidia-cuda:11.3-base
    steps:
      - run: pip install -r requirements.txt
      - cache:
          key: ${{ hashFiles('requirements.txt') }}
          paths:
            - /root/.cache/pip

training:
  strategy: horovod
  nodes: 4
  gpus_per_node: 8
  hyperparameters:
    - name: learning_rate
      values: [0.001, 0.0005, 0.0001]
    - name: batch_size
      values: [32, 64, 128]

alerts:
  - metric: training_loss
    threshold: 10.0
    condition: value > threshold or is_nan()
    actions:
      - type: email
        recipients: [team@example.com]
      - type: stop_training

deployment:
  formats:
    - onnx
    - tensorrt
    - torchscript
  destination:
    type: s3
    path: s3://model-registry/deepseek/

experiment:
  control: v1.2.0
  variants:
    - version: v1.3.0
      traffic: 20%
  metrics:
    - accuracy
    - latency
    - throughput

validation:
  stages:
    - name: quick-check
      dataset: small-test-set
      timeout: 30m
    - name: thorough-eval
      dataset: full-test-set
      timeout: 2h
"""

# Every section, most keys: the round trip and the summary must carry all of it.
FULL = """\
name: tiny-deepseek
x-defaults: &defaults
  container: python:3.11-slim
  timeout: 20m
triggers:
  - type: git-push
    branches: [main, "release/**", "!release/old"]
    paths: ["model/**", "!docs/**"]
jobs:
  setup:
    <<: *defaults
    steps:
      - name: install
        run: pip install -r requirements.txt
        env: {PIP_NO_CACHE_DIR: 1, VERBOSE: true}
      - cache:
          key: pip-${{ hashFiles('requirements.txt', 'setup.cfg') }}
          paths: /root/.cache/pip
    resources: {cpu: 2, memory: 8Gi, gpus: 0}
  lint:
    <<: *defaults
    steps: [{run: ruff check .}]
    needs: setup
data:
  corpus:
    source: s3://datasets/tiny-corpus/
    preprocess: python prep.py --out $CIUIC_OUTPUT_DIR
    version: latest
  vocab: data/vocab
training:
  strategy: ddp
  nodes: 2
  gpus_per_node: 4
  command: python train.py --lr ${{ hparams.lr }} --layers ${{ hparams.layers }}
  env: {OMP_NUM_THREADS: "4"}
  hyperparameters:
    - name: lr
      min: 1e-5
      max: 1e-2
      distribution: log_uniform
    - name: layers
      min: 2
      max: 8
      distribution: int
    - name: optimizer
      values: [adam, sgd]
  search: bayesian
  trials: 20
  max_concurrent_trials: 4
  seed: 7
  objective: {metric: val_loss, mode: min, scope: avg_last_k, k: 3}
  early_stopping: {type: asha, grace_period: 2, reduction_factor: 3, max_t: 50}
  init_from: deepseek@latest
  timeout: 1h30m
  max_retries: 2
alerts:
  - name: loss-explodes
    metric: training_loss
    threshold: 10
    condition: value > threshold or is_nan()
    for: 2m
    actions:
      - type: stop_training
  - metric: gpu/utilization
    low: 0.2
    condition: value < low
    for: 10m
    no_data: 5m
    actions:
      - type: webhook
        url: https://hooks.example.com/ciuic
      - type: email
        recipients: ml-team@example.com
validation:
  stages:
    - name: quick-check
      dataset: small-test-set
      timeout: 30m
      gates: ["accuracy >= baseline - 0.01"]
    - name: thorough-eval
      dataset: corpus
      timeout: 2h
      command: python eval.py --full
      gates: ["loss <= baseline.loss * 1.05", "not is_nan(loss)"]
deployment:
  formats: [onnx, torchscript]
  destination: {type: s3, path: "s3://model-registry/tiny/"}
  model: tiny-deepseek
experiment:
  control: v1.2.0
  variants:
    - version: v1.3.0
      traffic: 20%
    - version: v1.4.0
      traffic: 12.5
  metrics: [accuracy, latency]
  duration: 1d
  min_samples: 1000
rollout:
  strategy: canary
  steps: [10%, 50%, 100%]
  interval: 15m
  analysis: ["error_rate <= baseline.error_rate * 1.1"]
"""

MINIMAL = "jobs:\n  build:\n    steps:\n      - run: make\n"


def errors(text: str) -> list[SpecIssue]:
    """The issues load_pipeline reports for `text` (which must be invalid)."""
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline(textwrap.dedent(text))
    return raised.value.issues


def only_error(text: str) -> SpecIssue:
    found = errors(text)
    assert len(found) == 1, [f"{i.line}:{i.column}: {i.path}: {i.message}" for i in found]
    return found[0]


# --- the seed ---------------------------------------------------------------------------------


def test_the_seed_validates_unchanged() -> None:
    p = load_pipeline(SEED)

    assert p.triggers[0].type == "git-push"
    assert p.triggers[0].branches == ["main"]
    assert p.triggers[0].paths == ["deepseek/**", "requirements.txt"]
    setup = p.jobs["setup"]
    assert setup.container == "nvidia-cuda:11.3-base"
    assert isinstance(setup.steps[0], RunStep)
    assert setup.steps[0].run == "pip install -r requirements.txt"
    assert isinstance(setup.steps[1], CacheStep)
    assert setup.steps[1].cache.key == "${{ hashFiles('requirements.txt') }}"
    assert setup.steps[1].cache.paths == ["/root/.cache/pip"]
    training = p.training
    assert training is not None
    assert (training.strategy, training.nodes, training.gpus_per_node) == ("horovod", 4, 8)
    assert training.hyperparameters == [
        ValuesParameter(name="learning_rate", values=[0.001, 0.0005, 0.0001]),
        ValuesParameter(name="batch_size", values=[32, 64, 128]),
    ]
    assert training.command == DEFAULT_TRAINING_COMMAND
    assert (training.search, training.trials) == ("grid", 9)
    rule = p.alerts[0]
    assert (rule.name, rule.metric, rule.params) == (
        "training_loss",
        "training_loss",
        {"threshold": 10.0},
    )
    assert rule.condition == "value > threshold or is_nan()"
    assert rule.actions == [
        EmailAction(type="email", recipients=["team@example.com"]),
        StopTrainingAction(type="stop_training"),
    ]
    assert p.deployment is not None
    assert p.deployment.formats == ["onnx", "tensorrt", "torchscript"]
    assert p.deployment.destination.path == "s3://model-registry/deepseek/"
    assert p.deployment.model == "deepseek"
    assert p.experiment is not None
    assert p.experiment.variants[0].traffic == 20.0
    assert p.experiment.control_traffic == 80.0
    assert p.validation is not None
    stages = p.validation.stages
    assert [(s.name, s.dataset, s.timeout) for s in stages] == [
        ("quick-check", "small-test-set", timedelta(minutes=30)),
        ("thorough-eval", "full-test-set", timedelta(hours=2)),
    ]
    assert all(stage.command == DEFAULT_EVALUATION_COMMAND for stage in stages)


@pytest.mark.skipif(not SHARED_SEED.exists(), reason="no shared/seed beside this checkout")
def test_the_tested_seed_is_the_shared_seed_file() -> None:
    assert SHARED_SEED.read_text() == SEED


def test_the_seed_summary_has_nine_trials_of_thirty_two_gpus() -> None:
    summary = summarize(load_pipeline(SEED))

    assert summary.trials == 9
    assert summary.gpus_per_trial == 32
    assert (summary.strategy, summary.nodes, summary.gpus_per_node) == ("horovod", 4, 8)
    assert summary.stages == [
        "setup",
        "training",
        "validation:quick-check",
        "validation:thorough-eval",
        "packaging",
        "experiment",
    ]
    assert summary.datasets == []
    assert [(a.name, a.actions) for a in summary.alerts] == [
        ("training_loss", ["email", "stop_training"])
    ]
    assert [(s.name, s.timeout) for s in summary.validation_stages] == [
        ("quick-check", "30m"),
        ("thorough-eval", "2h"),
    ]
    assert summary.deployment_formats == ["onnx", "tensorrt", "torchscript"]
    assert summary.experiment_split == {"v1.2.0": 80.0, "v1.3.0": 20.0}
    assert summary.objective == "min training_loss (last)"


def test_a_pipeline_using_every_section_validates_and_summarises() -> None:
    p = load_pipeline(FULL)
    summary = summarize(p)

    assert summary.stages == [
        "setup",
        "lint",
        "data",
        "training",
        "validation:quick-check",
        "validation:thorough-eval",
        "packaging",
        "experiment",
        "rollout:canary",
    ]
    assert (summary.trials, summary.gpus_per_trial, summary.search) == (20, 8, "bayesian")
    assert summary.experiment_split == {"v1.2.0": 67.5, "v1.3.0": 20.0, "v1.4.0": 12.5}
    assert summary.rollout == "canary 10% -> 50% -> 100%"
    assert p.jobs["setup"].container == "python:3.11-slim"  # from the x-defaults anchor
    assert p.jobs["lint"].needs == ["setup"]
    assert p.jobs["setup"].resources.memory == 8 * 1024**3
    step = p.jobs["setup"].steps[0]
    assert isinstance(step, RunStep)
    assert step.env == {"PIP_NO_CACHE_DIR": "1", "VERBOSE": "true"}
    assert p.data["vocab"].source == "data/vocab"
    assert p.training is not None
    assert p.training.hyperparameters[0] == RangeParameter(
        name="lr", min=1e-5, max=1e-2, distribution="log_uniform"
    )
    assert p.training.early_stopping is not None
    assert (p.training.early_stopping.metric, p.training.early_stopping.mode) == ("val_loss", "min")
    assert [rule.name for rule in p.alerts] == ["loss-explodes", "gpu-utilization"]
    assert p.alerts[1].for_ == timedelta(minutes=10)


# --- many mistakes at once, located -------------------------------------------------------


THREE_MISTAKES = """\
trigers:
  - type: git-push
    branches: [main]
training:
  strategy: ddp
  nodes: 2
  gpus_per_node: 4
  command: python train.py --lr ${{ hparams.learning_rate }}
  hyperparameters:
    - name: learning_rate
      values: [0.1, 0.01]
    - name: batch_size
      values: []
experiment:
  control: v1
  variants:
    - version: v2
      traffic: 60%
    - version: v3
      traffic: 50%
  metrics: [accuracy]
"""


def test_three_different_mistakes_are_all_reported_at_their_lines_and_columns() -> None:
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline(THREE_MISTAKES)

    assert raised.value.format().splitlines() == [
        ".ciuicci.yaml:1:1: trigers: unknown key 'trigers' (did you mean 'triggers'?)",
        ".ciuicci.yaml:13:15: training.hyperparameters[1].values: a sweep needs at least one value",
        ".ciuicci.yaml:17:5: experiment.variants: the variants take 60% + 50% = 110% of the "
        "traffic; together they may take at most 100% (the control gets the rest)",
    ]


def test_the_error_names_its_file_and_is_an_invalid_argument() -> None:
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline(THREE_MISTAKES, filename="repo/.ciuicci.yaml")

    error = raised.value
    assert isinstance(error, InvalidArgument)
    assert error.filename == "repo/.ciuicci.yaml"
    assert str(error) == error.format()
    assert pickle.loads(pickle.dumps(error)).issues == error.issues
    assert all(line.startswith("repo/.ciuicci.yaml:") for line in error.format().splitlines())
    assert [(i.line, i.column) for i in error.issues] == sorted(
        (i.line or 0, i.column or 0) for i in error.issues
    )


def test_problems_in_independent_sections_are_reported_together() -> None:
    found = errors(
        """\
        jobs:
          build:
            steps: [{run: make}]
            timeout: 30 minutes
        training:
          nodes: four
        alerts:
          - metric: loss
            condition: value > limit
        deployment:
          formats: [onnx, pt]
          destination: {type: s3, path: "s3://registry/m/"}
        """
    )

    assert [(i.path, i.line, i.column) for i in found] == [
        ("jobs.build.timeout", 4, 14),
        ("training.nodes", 6, 10),
        ("alerts[0].condition", 9, 24),
        ("deployment.formats[1]", 11, 19),
    ]
    messages = [i.message for i in found]
    assert messages[0] == "'30 minutes' is not a duration (use e.g. 30m, 2h, 1h30m, 90s or 1d)"
    assert messages[1] == "must be a whole number, not text 'four'"
    assert "'limit', which is not a parameter of this rule" in messages[2]
    assert messages[3] == ("'pt' is not allowed here; expected one of: onnx, torchscript, tensorrt")


# --- unknown keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "message", "line", "column"),
    [
        (
            "trigers: []\n" + MINIMAL,
            "trigers",
            "unknown key 'trigers' (did you mean 'triggers'?)",
            1,
            1,
        ),
        (
            MINIMAL + "training:\n  gpus_per_nod: 8\n",
            "training.gpus_per_nod",
            "unknown key 'gpus_per_nod' (did you mean 'gpus_per_node'?)",
            6,
            3,
        ),
        (
            "jobs:\n  build:\n    stpes: [{run: make}]\n",
            "jobs.build.stpes",
            "unknown key 'stpes' (did you mean 'steps'?)",
            3,
            5,
        ),
        (
            "jobs:\n  b:\n    steps:\n      - run: make\n        shell: bash\n",
            "jobs.b.steps[0].shell",
            "unknown key 'shell'; the keys here are: name, run, env",
            5,
            9,
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condtion: value > 1\n",
            "alerts[0].condtion",
            "unknown key 'condtion' (did you mean 'condition'?)",
            7,
            5,
        ),
    ],
)
def test_an_unknown_key_is_reported_with_the_closest_known_one(
    text: str, path: str, message: str, line: int, column: int
) -> None:
    found = [i for i in errors(text) if i.path == path]
    assert [(i.message, i.line, i.column) for i in found] == [(message, line, column)]


def test_a_missing_required_key_points_at_the_mapping_that_lacks_it() -> None:
    issue = only_error(
        """\
        jobs:
          build:
            container: python:3.11
        """
    )
    assert (issue.path, issue.line, issue.column) == ("jobs.build.steps", 2, 3)
    assert issue.message == "required key 'steps' is missing"


def test_an_alert_parameter_must_be_a_number() -> None:
    issue = only_error(
        MINIMAL + "alerts:\n  - metric: loss\n    level: high\n    condition: value > 1\n"
    )
    assert (issue.path, issue.line) == ("alerts[0].level", 7)
    assert "as a parameter it must be a number, not 'high'" in issue.message


# --- cross-field checks -----------------------------------------------------------------------

JOB = "    steps: [{run: make}]\n"


@pytest.mark.parametrize(
    ("text", "path", "message", "line", "column"),
    [
        pytest.param(
            "jobs:\n  build:\n" + JOB + "    needs: [setpu]\n  setup:\n" + JOB,
            "jobs.build.needs[0]",
            "'setpu' is not a job (did you mean 'setup'?); jobs: build, setup",
            4,
            13,
            id="unknown-need",
        ),
        pytest.param(
            "jobs:\n  a:\n" + JOB + "    needs: b\n  b:\n" + JOB + "    needs: [a]\n",
            "jobs.a.needs[0]",
            "jobs depend on each other in a cycle: a -> b -> a",
            4,
            12,
            id="cycle",
        ),
        pytest.param(
            "jobs:\n  a:\n" + JOB + "    needs: [a]\n",
            "jobs.a.needs[0]",
            "job 'a' cannot need itself",
            4,
            13,
            id="self-need",
        ),
        pytest.param(
            MINIMAL + "experiment:\n  control: v1\n  variants:\n    - {version: v2, traffic: 70%}\n"
            "    - {version: v3, traffic: 40%}\n  metrics: [accuracy]\n",
            "experiment.variants",
            "the variants take 70% + 40% = 110% of the traffic; together they may take at most "
            "100% (the control gets the rest)",
            8,
            5,
            id="traffic-above-100",
        ),
        pytest.param(
            MINIMAL + "alerts:\n  - metric: loss\n    threshold: 3\n"
            "    condition: value > treshold or is_nan()\n",
            "alerts[0].condition",
            "condition uses 'treshold', which is not a parameter of this rule (did you mean "
            "'threshold'?); its parameters are: threshold",
            8,
            24,
            id="undefined-parameter",
        ),
        pytest.param(
            MINIMAL + "alerts:\n  - metric: loss\n    condition: 'value > limit'\n",
            "alerts[0].condition",
            "condition uses 'limit', which is not a parameter of this rule; add it next to the "
            "condition, e.g. limit: 10.0",
            7,
            25,
            id="parameter-in-quoted-condition",
        ),
        pytest.param(
            "training:\n  hyperparameters:\n    - {name: lr, values: []}\n",
            "training.hyperparameters[0].values",
            "a sweep needs at least one value",
            3,
            26,
            id="empty-sweep",
        ),
        pytest.param(
            "training:\n  command: python train.py --lr ${{ hparams.lr }}\n"
            "  hyperparameters:\n    - {name: learning_rate, values: [0.1]}\n",
            "training.command",
            "hparams.lr is not a declared hyperparameter; declared: learning_rate",
            2,
            37,
            id="undeclared-hparam-in-command",
        ),
        pytest.param(
            "jobs:\n  eval:\n    steps:\n      - run: echo ${{ hparams.batch }}\n"
            "training:\n  hyperparameters:\n    - {name: batch_size, values: [1]}\n",
            "jobs.eval.steps[0].run",
            "hparams.batch is not a declared hyperparameter (did you mean 'batch_size'?); "
            "declared: batch_size",
            4,
            23,
            id="undeclared-hparam-in-step",
        ),
        pytest.param(
            'jobs:\n  a:\n    steps:\n      - cache: {key: "${{ hashFiles(name) }}", paths: [x]}\n',
            "jobs.a.steps[0].cache.key",
            "hashFiles() takes file names as string literals, e.g. hashFiles('requirements.txt'), "
            "not name",
            4,
            27,
            id="hash-files-variable",
        ),
        pytest.param(
            "jobs:\n  a:\n    steps:\n      - run: echo ${{ 1 + }} done\n",
            "jobs.a.steps[0].run",
            "unexpected end of expression",
            4,
            27,
            id="template-syntax-column",
        ),
        pytest.param(
            "jobs:\n  a:\n    steps:\n      - run: echo ${{ version }}\n",
            "jobs.a.steps[0].run",
            "'version' is not available in ${{ }}: templates may use hparams.<name> and "
            "hashFiles('file', ...)",
            4,
            23,
            id="template-unknown-variable",
        ),
    ],
)
def test_a_cross_field_mistake_is_located(
    text: str, path: str, message: str, line: int, column: int
) -> None:
    issue = only_error(text)
    assert (issue.path, issue.message) == (path, message)
    assert (issue.line, issue.column) == (line, column)


def test_a_call_with_too_many_arguments_points_at_the_function() -> None:
    issue = only_error(
        MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1 or is_nan(1, 2)\n"
    )
    assert (issue.line, issue.column, issue.message) == (
        7,
        29,
        "is_nan() takes 0 to 1 arguments, got 2",
    )


def test_a_template_error_in_a_multi_line_command_points_at_the_command() -> None:
    issue = only_error(
        """\
        jobs:
          a:
            steps:
              - run: |
                  echo start
                  echo ${{ hparams. }}
        """
    )
    assert (issue.path, issue.line, issue.column) == ("jobs.a.steps[0].run", 4, 14)


@pytest.mark.parametrize(
    ("training", "path", "message"),
    [
        (
            "hyperparameters:\n  - {name: lr, min: 0.1, max: 0.01}\ntrials: 5\n",
            "training.hyperparameters[0].max",
            "max (0.01) must be greater than min (0.1)",
        ),
        (
            "hyperparameters:\n  - {name: lr, min: 0, max: 1, distribution: log_uniform}\n"
            "trials: 5\n",
            "training.hyperparameters[0].min",
            "a log_uniform range needs min > 0",
        ),
        (
            "hyperparameters:\n  - {name: layers, min: 1.5, max: 4, distribution: int}\n"
            "trials: 5\n",
            "training.hyperparameters[0].min",
            "an int range needs whole bounds, not 1.5",
        ),
        (
            "hyperparameters:\n  - {name: lr, min: 0.1, max: 1}\n",
            "training.trials",
            "a random search needs trials: how many to run, e.g. 20",
        ),
        (
            "search: grid\nhyperparameters:\n  - {name: lr, min: 0.1, max: 1}\n",
            "training.hyperparameters[0]",
            "a grid search needs values lists, and 'lr' is a range; give it values: [...] or "
            "set search: random or bayesian",
        ),
        (
            "hyperparameters:\n  - {name: lr, values: [1, 2]}\ntrials: 3\n",
            "training.trials",
            "a grid search runs every combination (2); remove trials, or set search: random to "
            "sample 3 of them",
        ),
        (
            "hyperparameters:\n  - {name: lr, values: [1, 2]}\n  - {name: lr, values: [3]}\n",
            "training.hyperparameters[1].name",
            "hyperparameter 'lr' is declared twice",
        ),
        (
            "hyperparameters:\n  - {name: lr, values: [1, 1]}\n",
            "training.hyperparameters[0].values",
            "1 is listed twice",
        ),
        (
            "hyperparameters:\n  - {name: lr, values: [1], min: 0}\n",
            "training.hyperparameters[0]",
            "a hyperparameter has either values: or min:/max:, not both",
        ),
        (
            "strategy: none\nnodes: 2\n",
            "training.nodes",
            "strategy none runs a single process; use ddp or horovod for 2 nodes",
        ),
        (
            "objective: {metric: acc, mode: max, scope: avg_last_k}\n",
            "training.objective.k",
            "scope avg_last_k needs k: how many last values to average",
        ),
        (
            "early_stopping: {type: asha}\n",
            "training.early_stopping",
            "early stopping compares trials; it needs a sweep of more than one trial",
        ),
        (
            "init_from: deepseek\n",
            "training.init_from",
            "'deepseek' is not a registered model version: write MODEL:VERSION (e.g. "
            "deepseek:v1.2.0) or MODEL@ALIAS (e.g. deepseek@latest)",
        ),
        (
            "strategy: horovd\n",
            "training.strategy",
            "'horovd' is not allowed here (did you mean "
            "'horovod'?); expected one of: ddp, horovod, none",
        ),
        ("nodes: '4'\n", "training.nodes", "must be a whole number, not text '4'"),
        ("gpus_per_node: -1\n", "training.gpus_per_node", "must be at least 0, not -1"),
        (
            "hyperparameters:\n  - {name: a, values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n"
            "  - {name: b, values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n"
            "  - {name: c, values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n"
            "  - {name: d, values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n",
            "training.hyperparameters",
            f"the grid has 11000 combinations, more than {MAX_TRIALS}; use fewer values or "
            "search: random with trials",
        ),
    ],
)
def test_a_training_mistake_is_explained(training: str, path: str, message: str) -> None:
    issue = only_error("training:\n" + textwrap.indent(training, "  "))
    assert (issue.path, issue.message) == (path, message)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            "triggers:\n  - type: cron\n",
            "triggers[0].type",
            "unsupported type 'cron'; supported: git-push",
        ),
        (
            "triggers:\n  - {type: git-push, paths: ['src/[a-']}\n",
            "triggers[0].paths[0]",
            "in the pattern 'src/[a-'",
        ),
        (
            "jobs:\n  a:\n    steps: [{run: make, cache: {key: k, paths: [p]}}]\n",
            "jobs.a.steps[0]",
            "a step has either run: or cache:, not both; split it into two steps",
        ),
        (
            "jobs:\n  a:\n    steps: [make test]\n",
            "jobs.a.steps[0]",
            "a step is a mapping such as `- run: make test`, not 'make test'",
        ),
        (
            "jobs:\n  a:\n    steps: []\n",
            "jobs.a.steps",
            "needs at least 1 item(s)",
        ),
        (
            "jobs:\n  a b:\n    steps: [{run: make}]\n",
            "jobs['a b']",
            "'a b' is not a valid name: use letters, digits, '-' and '_', starting with a letter",
        ),
        (
            "jobs:\n  a:\n    steps: [{run: make}]\n    env: {CIUIC_RUN_ID: x}\n",
            "jobs.a.env.CIUIC_RUN_ID",
            "CIUIC_RUN_ID is set by the platform: CIUIC_* variables are reserved",
        ),
        (
            "jobs:\n  a:\n    steps: [{run: make}]\n    resources: {memory: 8 GB}\n",
            "jobs.a.resources.memory",
            "'8 GB' is not a size (use e.g. 512Mi, 8Gi or 1G)",
        ),
        (
            MINIMAL + "data:\n  train: gs://bucket/x\n",
            "data.train.source",
            "'gs://bucket/x': a data source is an s3:// URL or a path in the repository",
        ),
        (
            MINIMAL + "data:\n  train: {source: ../outside}\n",
            "data.train.source",
            "'../outside' is not a path inside the repository: write it relative to the "
            "repository root (e.g. data/train) or use an s3:// URL",
        ),
        (
            MINIMAL + "data:\n  my-set: data/a\n  my_set: data/b\n",
            "data.my_set",
            "'my_set' and 'my-set' would both be CIUIC_DATA_MY_SET in the job; rename one",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1\n"
            "    actions: [{type: emial}]\n",
            "alerts[0].actions[0]",
            "unknown action type 'emial' (did you mean 'email'?); supported: email, webhook, "
            "stop_training",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1\n"
            "    actions: [{type: email, recipients: []}]\n",
            "alerts[0].actions[0].recipients",
            "needs at least 1 item(s)",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1\n"
            "    actions: [{type: email, recipients: [team]}]\n",
            "alerts[0].actions[0].recipients[0]",
            "'team' is not an email address",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1\n"
            "    actions: [{type: webhook, url: 'ftp://x'}]\n",
            "alerts[0].actions[0].url",
            "'ftp://x' is not an http:// or https:// URL",
        ),
        (
            MINIMAL + "alerts:\n  - {name: a, metric: loss, condition: value > 1}\n"
            "  - {name: a, metric: acc, condition: value < 1}\n",
            "alerts[1].name",
            "alert 'a' is declared twice",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    condition: value > 1 or is_nan(value, 2)\n",
            "alerts[0].condition",
            "is_nan() takes 0 to 1 arguments, got 2",
        ),
        (
            MINIMAL + "alerts:\n  - metric: loss\n    value: 3\n    condition: value > 1\n",
            "alerts[0].value",
            "'value' is reserved in conditions and cannot be a parameter",
        ),
    ],
)
def test_a_section_mistake_is_explained(text: str, path: str, message: str) -> None:
    issue = only_error(text)
    assert issue.path == path
    assert message in issue.message


TRAINED = MINIMAL + "training:\n  command: python train.py\n"
DEPLOYED = (
    TRAINED + "deployment:\n  formats: [onnx]\n  destination: {type: s3, path: 's3://reg/m/'}\n"
)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            TRAINED + "validation:\n  stages:\n    - {name: a, dataset: d, timeout: 1m}\n"
            "    - {name: a, dataset: d, timeout: 1m}\n",
            "validation.stages[1].name",
            "stage 'a' is declared twice",
        ),
        (
            TRAINED + "validation:\n  stages:\n    - {name: a, dataset: d, timeout: 0s}\n",
            "validation.stages[0].timeout",
            "'0s' is too short: it must be longer than zero",
        ),
        (
            TRAINED + "validation:\n  stages:\n    - name: a\n      dataset: d\n      timeout: 1m\n"
            "      gates: ['acc > baseline and loss < baseline']\n",
            "validation.stages[0].gates[0]",
            "a bare 'baseline' is the baseline of the gate's one metric, but this gate names 2 "
            "metrics; write baseline.<metric>",
        ),
        (
            TRAINED + "validation:\n  stages:\n    - name: a\n      dataset: d\n      timeout: 1m\n"
            "      gates: ['accuracy >= baseline.train.acc']\n",
            "validation.stages[0].gates[0]",
            "'baseline.train.acc' is not a metric name",
        ),
        (
            TRAINED + "validation:\n  stages:\n    - name: a\n      dataset: d\n      timeout: 1m\n"
            "      gates: ['mean(acc) > 0.5']\n",
            "validation.stages[0].gates[0]",
            "unknown function 'mean'",
        ),
        (
            TRAINED + "validation:\n  stages:\n    - name: a\n      dataset: d\n      timeout: 1m\n"
            "      command: python eval.py --lr ${{ hparams.lr }}\n",
            "validation.stages[0].command",
            "hparams.lr is not declared: training.hyperparameters is empty",
        ),
        (
            MINIMAL + "validation:\n  stages:\n    - {name: a, dataset: d, timeout: 1m}\n",
            "validation",
            "validation needs a training section to produce a model",
        ),
        (
            TRAINED + "deployment:\n  formats: [onnx, onnx]\n"
            "  destination: {type: s3, path: 's3://reg/m/'}\n",
            "deployment.formats[1]",
            "onnx is listed twice",
        ),
        (
            TRAINED
            + "deployment:\n  formats: [onnx]\n  destination: {type: s3, path: 's3://reg'}\n",
            "deployment.model",
            "name the model (model: deepseek), or end destination.path with it",
        ),
        (
            TRAINED
            + "deployment:\n  formats: [onnx]\n  destination: {type: gcs, path: 's3://reg/m'}\n",
            "deployment.destination.type",
            "unsupported type 'gcs'; supported: s3",
        ),
        (
            TRAINED + "deployment:\n",
            "deployment",
            "the section is empty: indent its keys under it, or remove it",
        ),
        (
            MINIMAL + "experiment:\n  control: v1\n  variants: [{version: v1, traffic: 10%}]\n"
            "  metrics: [accuracy]\n",
            "experiment.variants[0].version",
            "v1 appears twice among the control and variants",
        ),
        (
            MINIMAL + "experiment:\n  control: 1.2\n  variants: [{version: v2, traffic: 10%}]\n"
            "  metrics: [accuracy]\n",
            "experiment.control",
            "must be text, not the number 1.2; quote it: '1.2'",
        ),
        (
            MINIMAL + "experiment:\n  control: v1\n  variants: [{version: v2, traffic: 120%}]\n"
            "  metrics: [accuracy]\n",
            "experiment.variants[0].traffic",
            "'120%' is not between 0% and 100%",
        ),
        (
            DEPLOYED + "rollout:\n  strategy: canary\n",
            "rollout.steps",
            "a canary rollout needs steps, e.g. [10%, 50%, 100%]",
        ),
        (
            DEPLOYED + "rollout:\n  strategy: blue-green\n  steps: [50%]\n",
            "rollout.steps",
            "steps apply to a canary rollout, not blue-green",
        ),
        (
            DEPLOYED + "rollout:\n  strategy: canary\n  steps: [50%, 10%]\n",
            "rollout.steps[1]",
            "each step must take more traffic than the last",
        ),
        (
            TRAINED + "rollout:\n  strategy: shadow\n",
            "rollout",
            "a rollout needs a deployment section (what to roll out)",
        ),
        (
            "triggers: [{type: git-push}]\n",
            "",
            "the pipeline has nothing to run: add jobs or a training section",
        ),
    ],
)
def test_a_mistake_across_sections_is_explained(text: str, path: str, message: str) -> None:
    issue = only_error(text)
    assert issue.path == path
    assert message in issue.message


def test_a_yes_is_not_text_and_the_message_says_to_quote_it() -> None:
    issue = only_error("jobs:\n  a:\n    container: yes\n    steps: [{run: make}]\n")
    assert issue.path == "jobs.a.container"
    assert "quote it" in issue.message


def test_an_exponent_without_a_dot_is_a_number() -> None:
    p = load_pipeline(
        "training:\n  hyperparameters:\n    - {name: lr, values: [1e-3, 5E-4, 2e2]}\n"
    )
    assert p.training is not None
    parameter = p.training.hyperparameters[0]
    assert isinstance(parameter, ValuesParameter)
    assert parameter.values == [0.001, 0.0005, 200.0]


def test_alert_rules_are_named_after_their_metric_unless_named() -> None:
    p = load_pipeline(
        MINIMAL + "alerts:\n"
        "  - {metric: loss, condition: value > 1}\n"
        "  - {metric: loss, condition: is_nan()}\n"
        "  - {name: loss-2, metric: acc, condition: value < 0.1}\n"
    )
    assert [rule.name for rule in p.alerts] == ["loss", "loss-3", "loss-2"]


def test_job_order_puts_needs_first_and_keeps_file_order_otherwise() -> None:
    p = load_pipeline(
        "jobs:\n  test:\n" + JOB + "    needs: [build]\n  lint:\n" + JOB + "  build:\n" + JOB
    )
    assert job_order(p.jobs) == ["lint", "build", "test"]


def test_dataset_environment_variable_names() -> None:
    assert data_env_name("small-test-set") == "CIUIC_DATA_SMALL_TEST_SET"


# --- the spec on the bus ----------------------------------------------------------------------


@pytest.mark.parametrize("text", [SEED, FULL, MINIMAL], ids=["seed", "full", "minimal"])
def test_a_validated_spec_survives_json_and_validates_back_to_the_same_pipeline(text: str) -> None:
    pipeline = load_pipeline(text)
    spec = json.loads(json.dumps(pipeline.model_dump(mode="json")))

    again = Pipeline.model_validate(spec)

    assert again == pipeline
    assert again.model_dump(mode="json") == spec


def test_the_dumped_spec_is_resolved_and_written_as_in_the_file() -> None:
    spec = load_pipeline(FULL).model_dump(mode="json")

    assert spec["training"]["timeout"] == "1h30m"
    assert spec["experiment"]["variants"][1]["traffic"] == "12.5%"
    assert spec["experiment"]["duration"] == "1d"
    assert spec["jobs"]["setup"]["resources"]["memory"] == "8Gi"
    assert spec["alerts"][0]["for"] == "2m"
    assert spec["alerts"][0]["params"] == {"threshold": 10.0}
    assert spec["training"]["early_stopping"]["metric"] == "val_loss"
    assert "x-defaults" not in spec
    seed_spec = load_pipeline(SEED).model_dump(mode="json")
    assert seed_spec["training"]["search"] == "grid"
    assert seed_spec["training"]["trials"] == 9
    assert seed_spec["training"]["objective"] == {
        "metric": "training_loss",
        "mode": "min",
        "scope": "last",
        "k": None,
    }
    assert "rollout" not in seed_spec


def test_models_are_frozen() -> None:
    rule = load_pipeline(SEED).alerts[0]
    with pytest.raises(ValueError, match="frozen"):
        rule.metric = "other"  # type: ignore[misc]
    assert isinstance(rule, AlertRule)


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("2h", 7200),
        ("90s", 90),
        ("1h30m", 5400),
        ("1d", 86400),
        ("0s", 0),
        ("1d2h3m4s", 93784),
        (" 5m ", 300),
    ],
)
def test_a_duration_is_read_and_written_back_as_it_was_written(text: str, seconds: int) -> None:
    duration = Duration.parse(text)
    assert duration == timedelta(seconds=seconds)
    assert str(duration) == text.strip()
    assert copy.deepcopy(duration) == duration
    assert str(pickle.loads(pickle.dumps(duration))) == text.strip()


@pytest.mark.parametrize("text", ["30 minutes", "1.5h", "", "m", "30", "2h30", "1m1h", "-5m"])
def test_a_duration_that_is_not_one_says_how_to_write_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration \(use e\.g\. 30m, 2h, 1h30m"):
        parse_duration(text)


def test_a_bare_number_is_not_a_duration() -> None:
    issue = only_error(TRAINED + "  timeout: 3600\n")
    assert issue.message == "3600 is not a duration (use e.g. 30m, 2h, 1h30m, 90s or 1d)"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=300 * 86400))
def test_a_duration_written_by_us_reads_back_the_same(seconds: int) -> None:
    written = str(Duration.of(timedelta(seconds=seconds)))
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    ("value", "percent", "written"),
    [
        ("20%", 20.0, "20%"),
        ("12.5%", 12.5, "12.5%"),
        (20, 20.0, "20%"),
        (0.5, 0.5, "0.5%"),
        ("100%", 100.0, "100%"),
        ("0%", 0.0, "0%"),
    ],
)
def test_a_percentage_is_percent_from_0_to_100(value: object, percent: float, written: str) -> None:
    assert parse_percentage(value) == percent
    assert format_percentage(percent) == written
    assert parse_percentage(format_percentage(percent)) == percent


@pytest.mark.parametrize("value", ["120%", "-1%", "twenty", True, "20", 101])
def test_a_percentage_out_of_range_or_unreadable_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"percentage|between 0% and 100%"):
        parse_percentage(value)


@pytest.mark.parametrize(
    ("text", "size", "written"),
    [
        ("8Gi", 8 * 1024**3, "8Gi"),
        ("512Mi", 512 * 1024**2, "512Mi"),
        ("1G", 10**9, "1G"),
        ("1.5Gi", 3 * 1024**3 // 2, "1536Mi"),
        ("100k", 100_000, "100k"),
        (4096, 4096, "4Ki"),
        ("1500", 1500, "1500"),
    ],
)
def test_a_byte_size_uses_binary_and_decimal_units(text: object, size: int, written: str) -> None:
    assert parse_byte_size(text) == size
    assert format_byte_size(size) == written
    assert parse_byte_size(format_byte_size(size)) == size


@pytest.mark.parametrize("text", ["8 GB", "8gi", "lots", "0", "-1Gi", "1.1"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes"):
        parse_byte_size(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=2**60))
def test_every_size_is_written_so_that_it_reads_back(size: int) -> None:
    assert parse_byte_size(format_byte_size(size)) == size


def test_the_example_seed_pipeline_is_the_seed_verbatim() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "seed" / ".ciuicci.yaml"
    assert example.read_text() == SEED
