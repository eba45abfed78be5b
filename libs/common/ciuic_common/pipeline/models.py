"""The pipeline file as pydantic models: one class per section of `.ciuicci.yaml`.

Every model is frozen, refuses unknown keys and validates strictly (a quoted "4" is not a number,
`yes` is not a string). A validated Pipeline is *resolved*: defaults that depend on other fields
(the search kind, the number of trials, the objective, alert names, the model name) are filled
in, so `model_dump(mode="json")` is what the scheduler runs and `model_validate` of that dump
gives the same Pipeline back.

Checks that involve several fields raise one error carrying every problem found, each at a path
relative to the model (see `Problems`); the loader turns them into located issues.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ciuic_common.errors import InvalidArgument
from ciuic_common.globs import Glob, GlobError
from ciuic_common.pipeline.references import (
    Problem,
    check_condition,
    check_gate,
    check_templates,
    closest,
    undeclared_hyperparameters,
)
from ciuic_common.pipeline.units import ByteSize, Duration, Percentage, PositiveDuration
from ciuic_common.storage import S3Url

__all__ = [
    "DEFAULT_EVALUATION_COMMAND",
    "DEFAULT_OBJECTIVE_METRIC",
    "DEFAULT_TRAINING_COMMAND",
    "MAX_TRIALS",
    "Action",
    "AlertRule",
    "CacheSpec",
    "CacheStep",
    "Dataset",
    "Deployment",
    "EarlyStopping",
    "EmailAction",
    "Experiment",
    "GitPushTrigger",
    "Hyperparameter",
    "Job",
    "Objective",
    "Pipeline",
    "Problems",
    "RangeParameter",
    "Resources",
    "Rollout",
    "RunStep",
    "S3Destination",
    "SpecModel",
    "Step",
    "StopTrainingAction",
    "Training",
    "Validation",
    "ValidationStage",
    "ValuesParameter",
    "Variant",
    "WebhookAction",
]

#: What runs when `training.command` is left out (the seed pipeline has none).
DEFAULT_TRAINING_COMMAND: Final = "python train.py"
#: What runs for a validation stage without `command`; it evaluates on CIUIC_DATA_<DATASET>.
DEFAULT_EVALUATION_COMMAND: Final = "python evaluate.py"
#: The best trial is the one with the lowest last `training_loss` unless `objective` says more.
DEFAULT_OBJECTIVE_METRIC: Final = "training_loss"
#: A sweep larger than this is refused: it is almost certainly a mistake.
MAX_TRIALS: Final = 10_000

#: Top-level keys with this prefix are ignored: a place for YAML anchors.
EXTENSION_PREFIX: Final = "x-"
#: The pydantic error type that carries several located problems (see Problems).
SPEC_ERROR: Final = "pipeline_spec"
#: The key in the validation context under which each raw mapping's model class is noted.
MODELS_CONTEXT_KEY: Final = "ciuic_pipeline_models"

SpecPath = tuple[str | int, ...]


def _shown(value: object) -> str:
    """A value as the person wrote it: text quoted, anything else as is; shortened."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Problems:
    """Problems one validator found, each at a path relative to the model being validated.

    Raised together as one pydantic error whose context lists them, so a person sees every
    problem at once and the loader can locate each one.
    """

    def __init__(self) -> None:
        self.found: list[tuple[SpecPath, int | None, str]] = []

    def add(self, where: str | int | SpecPath, message: str, offset: int | None = None) -> None:
        """Note a problem at `where` (a key, an index or a path), `offset` chars into its text."""
        path = where if isinstance(where, tuple) else (where,)
        self.found.append((path, offset, message))

    def extend(self, where: str | int | SpecPath, problems: Iterable[Problem]) -> None:
        """Note problems found in the text at `where`."""
        for offset, message in problems:
            self.add(where, message, offset)

    def raise_if_any(self) -> None:
        """Raise the problems as one validation error, if there are any."""
        if not self.found:
            return
        summary = "; ".join(
            f"{'.'.join(map(str, path))}: {message}" if path else message
            for path, _, message in self.found
        )
        raise PydanticCustomError(
            SPEC_ERROR, "{summary}", {"summary": summary, "issues": tuple(self.found)}
        )


def note_model(info: ValidationInfo, data: Any, model: type[BaseModel]) -> None:
    """Remember which model validates the raw mapping `data`, to explain its unknown keys."""
    if isinstance(info.context, dict) and isinstance(data, dict):
        info.context.setdefault(MODELS_CONTEXT_KEY, {})[id(data)] = model


class SpecModel(BaseModel):
    """Base of every section: frozen, strict, unknown keys refused with a suggestion."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        serialize_by_alias=True,
        validate_by_alias=True,
        validate_by_name=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _note_model(cls, data: Any, info: ValidationInfo) -> Any:
        note_model(info, data, cls)
        return data

    @classmethod
    def known_keys(cls) -> list[str]:
        """The keys this section accepts, as written in the file."""
        return [field.alias or name for name, field in cls.model_fields.items()]

    @classmethod
    def unknown_key_message(cls, key: str, value: object) -> str:
        """What to tell a person who wrote `key`, which this section does not have."""
        known = cls.known_keys()
        match = closest(key, known)
        if match:
            return f"unknown key {_shown(key)} (did you mean {match!r}?)"
        return f"unknown key {_shown(key)}; the keys here are: {', '.join(known)}"


# ---------------------------------------------------------------------------------------------
# Small value types
# ---------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,127}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_MODEL_REF = re.compile(
    r"(?P<model>[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?::(?P<version>[A-Za-z0-9][A-Za-z0-9._+-]*)|@(?P<alias>[A-Za-z][A-Za-z0-9._-]*))"
)
_EMAIL = re.compile(r"[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>.]+")


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{_shown(value)} is not a valid {what}")
        return value

    return check


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _one_or_many(value: Any) -> Any:
    """`needs: setup` is short for `needs: [setup]`."""
    return [value] if isinstance(value, str) else value


Name = Annotated[
    str,
    AfterValidator(
        _matching(_NAME, "name: use letters, digits, '-' and '_', starting with a letter")
    ),
]
Identifier = Annotated[
    str,
    AfterValidator(
        _matching(_IDENTIFIER, "identifier: use letters, digits and '_', not starting with a digit")
    ),
]
Metric = Annotated[
    str,
    AfterValidator(_matching(_METRIC, "metric name: use letters, digits and '_', '.', '/', '-'")),
]
Version = Annotated[str, AfterValidator(_matching(_VERSION, "model version (e.g. v1.3.0)"))]
Text = Annotated[str, AfterValidator(_non_empty)]


def _env_name(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(
            f"{_shown(name)} is not an environment variable name: use letters, digits and '_'"
        )
    if name.upper().startswith("CIUIC_"):
        raise ValueError(f"{name} is set by the platform: CIUIC_* variables are reserved")
    return name


def _env_value(value: Any) -> Any:
    """Environment values are strings; numbers and booleans are written as YAML would show."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


Env = dict[Annotated[str, AfterValidator(_env_name)], Annotated[str, BeforeValidator(_env_value)]]


def _model_ref(value: str) -> str:
    if not _MODEL_REF.fullmatch(value):
        raise ValueError(
            f"{_shown(value)} is not a registered model version: write MODEL:VERSION "
            "(e.g. deepseek:v1.2.0) or MODEL@ALIAS (e.g. deepseek@latest)"
        )
    return value


def _s3_url(value: str) -> str:
    try:
        S3Url.parse(value)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None
    return value


def _data_source(value: str) -> str:
    scheme, sep, _ = value.partition("://")
    if sep:
        if scheme.lower() != "s3":
            raise ValueError(
                f"{_shown(value)}: a data source is an s3:// URL or a path in the repository"
            )
        return _s3_url(value)
    parts = value.replace("\\", "/").split("/")
    if not value.strip() or value.startswith(("/", "~")) or ".." in parts:
        raise ValueError(
            f"{_shown(value)} is not a path inside the repository: write it relative to the "
            "repository root (e.g. data/train) or use an s3:// URL"
        )
    return value


def _email(value: str) -> str:
    if not _EMAIL.fullmatch(value):
        raise ValueError(f"{_shown(value)} is not an email address")
    return value


def _http_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{_shown(value)} is not an http:// or https:// URL")
    return value


Email = Annotated[str, AfterValidator(_email)]


def _tag(
    kinds: dict[type[BaseModel], str], choose: Callable[[dict[str, Any]], str | None]
) -> Callable[[Any], str | None]:
    """A discriminator that accepts built models as well as mappings from the file."""

    def discriminate(value: Any) -> str | None:
        for model, tag in kinds.items():
            if isinstance(value, model):
                return tag
        return choose(value) if isinstance(value, dict) else None

    return discriminate


# ---------------------------------------------------------------------------------------------
# triggers
# ---------------------------------------------------------------------------------------------
class GitPushTrigger(SpecModel):
    """A push to a matching branch that changes a matching path starts the pipeline."""

    type: Literal["git-push"]
    #: Branch globs (`release/*`, `!wip/**`); empty: every branch.
    branches: Annotated[list[str], BeforeValidator(_one_or_many)] = []
    #: Path globs over the changed files (`deepseek/**`); empty: every change.
    paths: Annotated[list[str], BeforeValidator(_one_or_many)] = []

    @field_validator("branches", "paths")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        problems = Problems()
        for index, pattern in enumerate(patterns):
            try:
                Glob.compile(pattern)
            except GlobError as exc:
                problems.add(index, f"{exc.message} in the pattern {pattern!r}", exc.offset)
        problems.raise_if_any()
        return patterns


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------
def _raise_template_problems(where: str, text: str) -> None:
    # Hyperparameter names are checked by the pipeline, which knows what training declares.
    problems = Problems()
    problems.extend(where, check_templates(text, None))
    problems.raise_if_any()


class RunStep(SpecModel):
    """`run:` a shell command in the job's container."""

    name: Text | None = None
    run: Text
    env: Env = {}

    @model_validator(mode="after")
    def _check_templates(self) -> RunStep:
        _raise_template_problems("run", self.run)
        return self


class CacheSpec(SpecModel):
    """Restore `paths` from the cache under `key` before the job, save them after it."""

    key: Text
    paths: Annotated[list[Text], BeforeValidator(_one_or_many), Field(min_length=1)]

    @model_validator(mode="after")
    def _check_templates(self) -> CacheSpec:
        _raise_template_problems("key", self.key)
        return self


class CacheStep(SpecModel):
    """`cache:` with a key (often `${{ hashFiles('requirements.txt') }}`) and paths."""

    name: Text | None = None
    cache: CacheSpec


def _step_kind(data: dict[str, Any]) -> str | None:
    if ("run" in data) == ("cache" in data):
        return None
    return "step:run" if "run" in data else "step:cache"


def step_kind_message(value: Any) -> str:
    """Why `value` is not a step."""
    if isinstance(value, dict) and "run" in value:
        return "a step has either run: or cache:, not both; split it into two steps"
    if isinstance(value, dict):
        return "a step needs run: (a shell command) or cache: (a key and paths)"
    return f"a step is a mapping such as `- run: make test`, not {_shown(value)}"


Step = Annotated[
    Annotated[RunStep, Tag("step:run")] | Annotated[CacheStep, Tag("step:cache")],
    Discriminator(
        _tag({RunStep: "step:run", CacheStep: "step:cache"}, _step_kind),
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of run: or cache:",
    ),
]


class Resources(SpecModel):
    """What one job needs from its agent."""

    cpu: Annotated[float, Field(gt=0)] | None = None
    memory: ByteSize | None = None
    gpus: Annotated[int, Field(ge=0, le=64)] = 0


class Job(SpecModel):
    """A named job: steps run in order in `container`, after the jobs it `needs`."""

    container: Text | None = None
    steps: Annotated[list[Step], Field(min_length=1)]
    needs: Annotated[list[Name], BeforeValidator(_one_or_many)] = []
    timeout: PositiveDuration | None = None
    resources: Resources = Resources()
    env: Env = {}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class Dataset(SpecModel):
    """A named dataset: an S3 prefix or a repository path, optionally preprocessed."""

    source: Annotated[str, AfterValidator(_data_source)]
    #: A command that turns the source into what training reads (runs as a job, cached).
    preprocess: Text | None = None
    #: A dataset version id or tag to pin; None resolves the latest content.
    version: Text | None = None


def _dataset_shorthand(value: Any) -> Any:
    """`train: s3://bucket/prefix` is short for `train: {source: s3://bucket/prefix}`."""
    return {"source": value} if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
Scalar = bool | int | float | str


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{'text' if isinstance(value, str) else type(value).__name__} {_shown(value)}"


def _number(value: Any) -> int | float:
    # One validator rather than an int | float union, so a mistake gets one message, not two.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, not {_kind(value)}")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _scalar(value: Any) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"a value is a number, text or true/false, not {_kind(value)}")


Number = Annotated[int | float, PlainValidator(_number)]


class ValuesParameter(SpecModel):
    """A hyperparameter tried with each of `values` (a grid axis, or choices for a search)."""

    name: Identifier
    values: list[Annotated[Scalar, PlainValidator(_scalar)]]

    @field_validator("values")
    @classmethod
    def _values(cls, values: list[Scalar]) -> list[Scalar]:
        if not values:
            raise ValueError("a sweep needs at least one value")
        seen: set[tuple[type, Scalar]] = set()
        for value in values:
            if (type(value), value) in seen:
                raise ValueError(f"{_shown(value)} is listed twice")
            seen.add((type(value), value))
        return values


class RangeParameter(SpecModel):
    """A hyperparameter drawn from [min, max] (random or Bayesian search)."""

    name: Identifier
    min: Number
    max: Number
    distribution: Literal["uniform", "log_uniform", "int"] = "uniform"

    @model_validator(mode="after")
    def _check_range(self) -> RangeParameter:
        problems = Problems()
        if self.min >= self.max:
            problems.add("max", f"max ({self.max}) must be greater than min ({self.min})")
        if self.distribution == "log_uniform" and self.min <= 0:
            problems.add("min", "a log_uniform range needs min > 0")
        if self.distribution == "int":
            for key in ("min", "max"):
                bound = getattr(self, key)
                if bound != math.floor(bound):
                    problems.add(key, f"an int range needs whole bounds, not {bound}")
        problems.raise_if_any()
        return self


def _hyperparameter_kind(data: dict[str, Any]) -> str | None:
    has_values = "values" in data
    has_range = any(key in data for key in ("min", "max", "distribution"))
    if has_values == has_range:
        return None
    return "hyperparameter:values" if has_values else "hyperparameter:range"


def hyperparameter_kind_message(value: Any) -> str:
    """Why `value` is not a hyperparameter."""
    if isinstance(value, dict) and "values" in value:
        return "a hyperparameter has either values: or min:/max:, not both"
    if isinstance(value, dict):
        return "a hyperparameter needs values: [...] or min: and max:"
    return (
        "a hyperparameter is a mapping such as `- name: learning_rate` with values: [...] "
        f"or min:/max:, not {_shown(value)}"
    )


Hyperparameter = Annotated[
    Annotated[ValuesParameter, Tag("hyperparameter:values")]
    | Annotated[RangeParameter, Tag("hyperparameter:range")],
    Discriminator(
        _tag(
            {ValuesParameter: "hyperparameter:values", RangeParameter: "hyperparameter:range"},
            _hyperparameter_kind,
        ),
        custom_error_type="hyperparameter_kind",
        custom_error_message="a hyperparameter needs values: or min:/max:",
    ),
]


class Objective(SpecModel):
    """How trials are ranked: `metric` minimised or maximised over the run."""

    metric: Metric
    mode: Literal["min", "max"]
    #: Which value of the metric counts: the last logged, the best, or the mean of the last k.
    scope: Literal["last", "best", "avg_last_k"] = "last"
    k: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_k(self) -> Objective:
        problems = Problems()
        if self.scope == "avg_last_k" and self.k is None:
            problems.add("k", "scope avg_last_k needs k: how many last values to average")
        if self.scope != "avg_last_k" and self.k is not None:
            problems.add("k", "k applies only to scope: avg_last_k")
        problems.raise_if_any()
        return self


class EarlyStopping(SpecModel):
    """Stop the weakest trials early (ASHA: successive halving at rungs)."""

    type: Literal["asha"]
    #: Defaults to the objective's metric and mode.
    metric: Metric | None = None
    mode: Literal["min", "max"] | None = None
    #: Steps (as logged with ciuic.log(..., step=)) before a trial may be stopped.
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0
    #: The step at which a trial is complete; None: when its command ends.
    max_t: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_rungs(self) -> EarlyStopping:
        problems = Problems()
        if self.max_t is not None and self.max_t <= self.grace_period:
            problems.add("max_t", f"max_t must be greater than grace_period ({self.grace_period})")
        problems.raise_if_any()
        return self


class Training(SpecModel):
    """Distributed training, swept over hyperparameters; the best trial goes on."""

    strategy: Literal["ddp", "horovod", "none"] = "ddp"
    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = 0
    # Declared before `command`, whose validator reads them.
    hyperparameters: list[Hyperparameter] = []
    command: Text = DEFAULT_TRAINING_COMMAND
    container: Text | None = None
    env: Env = {}
    #: Resolved: grid when every hyperparameter is a values list, random otherwise.
    search: Literal["grid", "random", "bayesian"] | None = None
    #: Resolved: the grid's size for a grid search; required for random and bayesian.
    trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = None
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    objective: Objective = Objective(metric=DEFAULT_OBJECTIVE_METRIC, mode="min")
    early_stopping: EarlyStopping | None = None
    init_from: Annotated[str, AfterValidator(_model_ref)] | None = None
    timeout: PositiveDuration | None = None
    max_retries: Annotated[int, Field(ge=0, le=10)] = 0

    @property
    def gpus_per_trial(self) -> int:
        """GPUs one trial holds: nodes x gpus_per_node."""
        return self.nodes * self.gpus_per_node

    @property
    def trial_count(self) -> int:
        """How many trials the sweep runs (1 without hyperparameters)."""
        return self.trials or 1

    @property
    def hyperparameter_names(self) -> list[str]:
        """The declared hyperparameter names, in order."""
        return [parameter.name for parameter in self.hyperparameters]

    @field_validator("command")
    @classmethod
    def _check_templates(cls, command: str, info: ValidationInfo) -> str:
        # Without valid hyperparameters (reported on their own) only the syntax is checked.
        declared = info.data.get("hyperparameters")
        names = None if declared is None else [parameter.name for parameter in declared]
        problems = Problems()
        problems.extend((), check_templates(command, names))
        problems.raise_if_any()
        return command

    @model_validator(mode="after")
    def _resolve(self) -> Training:
        problems = Problems()
        seen: set[str] = set()
        for index, parameter in enumerate(self.hyperparameters):
            if parameter.name in seen:
                problems.add(
                    ("hyperparameters", index, "name"),
                    f"hyperparameter {parameter.name!r} is declared twice",
                )
            seen.add(parameter.name)
        search, trials = self._resolve_search(problems)
        if self.strategy == "none" and self.nodes > 1:
            problems.add(
                "nodes",
                f"strategy none runs a single process; use ddp or horovod for {self.nodes} nodes",
            )
        if self.early_stopping is not None and trials is not None and trials < 2:
            problems.add(
                "early_stopping",
                "early stopping compares trials; it needs a sweep of more than one trial",
            )
        problems.raise_if_any()
        update: dict[str, Any] = {"search": search, "trials": trials}
        if self.early_stopping is not None:
            update["early_stopping"] = self.early_stopping.model_copy(
                update={
                    "metric": self.early_stopping.metric or self.objective.metric,
                    "mode": self.early_stopping.mode or self.objective.mode,
                }
            )
        return self.model_copy(update=update)

    def _resolve_search(self, problems: Problems) -> tuple[str, int | None]:
        ranges = [
            (index, parameter)
            for index, parameter in enumerate(self.hyperparameters)
            if isinstance(parameter, RangeParameter)
        ]
        search = self.search or ("random" if ranges else "grid")
        if search == "grid":
            for index, parameter in ranges:
                problems.add(
                    ("hyperparameters", index),
                    f"a grid search needs values lists, and {parameter.name!r} is a range; "
                    "give it values: [...] or set search: random or bayesian",
                )
            if ranges:
                return search, self.trials
            grid = math.prod(
                len(p.values) for p in self.hyperparameters if isinstance(p, ValuesParameter)
            )
            if grid > MAX_TRIALS:
                problems.add(
                    "hyperparameters",
                    f"the grid has {grid} combinations, more than {MAX_TRIALS}; "
                    "use fewer values or search: random with trials",
                )
            elif self.trials is not None and self.trials != grid:
                problems.add(
                    "trials",
                    f"a grid search runs every combination ({grid}); remove trials, or set "
                    f"search: random to sample {self.trials} of them",
                )
            return search, grid
        if not self.hyperparameters:
            problems.add("search", f"a {search} search needs hyperparameters to search over")
        if self.trials is None:
            problems.add("trials", f"a {search} search needs trials: how many to run, e.g. 20")
        return search, self.trials


# ---------------------------------------------------------------------------------------------
# alerts
# ---------------------------------------------------------------------------------------------
class EmailAction(SpecModel):
    """Send an email to every recipient."""

    type: Literal["email"]
    recipients: Annotated[list[Email], BeforeValidator(_one_or_many), Field(min_length=1)]


class WebhookAction(SpecModel):
    """POST the alert as JSON to `url`."""

    type: Literal["webhook"]
    url: Annotated[str, AfterValidator(_http_url)]


class StopTrainingAction(SpecModel):
    """Stop the trial whose metric fired the alert."""

    type: Literal["stop_training"]


_ACTIONS: dict[str, type[SpecModel]] = {
    "email": EmailAction,
    "webhook": WebhookAction,
    "stop_training": StopTrainingAction,
}


def _action_kind(data: dict[str, Any]) -> str | None:
    kind = data.get("type")
    return f"action:{kind}" if isinstance(kind, str) and kind in _ACTIONS else None


def action_kind_message(value: Any) -> str:
    """Why `value` is not an action."""
    supported = ", ".join(_ACTIONS)
    if isinstance(value, dict) and "type" in value:
        match = closest(str(value["type"]), _ACTIONS)
        hint = f" (did you mean {match!r}?)" if match else ""
        return f"unknown action type {_shown(value['type'])}{hint}; supported: {supported}"
    if isinstance(value, dict):
        return f"an action needs type: one of {supported}"
    return f"an action is a mapping such as `- type: stop_training`, not {_shown(value)}"


Action = Annotated[
    Annotated[EmailAction, Tag("action:email")]
    | Annotated[WebhookAction, Tag("action:webhook")]
    | Annotated[StopTrainingAction, Tag("action:stop_training")],
    Discriminator(
        _tag(
            {
                EmailAction: "action:email",
                WebhookAction: "action:webhook",
                StopTrainingAction: "action:stop_training",
            },
            _action_kind,
        ),
        custom_error_type="action_kind",
        custom_error_message="an action needs type: email, webhook or stop_training",
    ),
]

_RESERVED_PARAMETERS = frozenset({"value", "is_nan", "is_inf", "abs", "min", "max"})


def _parameter_name(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{_shown(name)} cannot be a rule parameter: use letters, digits and '_'")
    if name in _RESERVED_PARAMETERS:
        raise ValueError(f"{name!r} is reserved in conditions and cannot be a parameter")
    return name


class AlertRule(SpecModel):
    """A condition on one live metric, with the actions to take when it holds.

    Keys other than the rule's own are its numeric parameters (`threshold: 10.0`), which the
    condition may name next to `value`. They are gathered under `params`.
    """

    #: Resolved: the metric's name (with -2, -3... when several rules watch one metric).
    name: Name | None = None
    metric: Metric
    # Declared before `condition`, whose validator reads them.
    params: dict[Annotated[str, AfterValidator(_parameter_name)], float] = {}
    condition: Text
    #: How long the condition must hold before the alert fires; None: at once.
    for_: Duration | None = Field(default=None, alias="for")
    #: Fire when the metric has had no new point for this long; None: never.
    no_data: PositiveDuration | None = None
    actions: list[Action] = []

    @model_validator(mode="before")
    @classmethod
    def _gather_parameters(cls, data: Any, info: ValidationInfo) -> Any:
        note_model(info, data, cls)
        if not isinstance(data, dict) or "params" in data:
            return data
        own = {*cls.known_keys(), *cls.model_fields}
        numbers = {
            key: value
            for key, value in data.items()
            if key not in own and isinstance(value, int | float) and not isinstance(value, bool)
        }
        if not numbers:
            return data
        # Other unknown keys stay where they are and are reported as unknown keys.
        rest = {key: value for key, value in data.items() if key not in numbers}
        return {**rest, "params": numbers}

    @classmethod
    def unknown_key_message(cls, key: str, value: object) -> str:
        """A rule's unknown key is either a typo of a known key or a non-numeric parameter."""
        match = closest(key, cls.known_keys())
        if match:
            return f"unknown key {_shown(key)} (did you mean {match!r}?)"
        return (
            f"{_shown(key)} is not a key of an alert rule, and as a parameter it must be a number, "
            f"not {_shown(value)}"
        )

    @field_validator("condition")
    @classmethod
    def _check_condition(cls, condition: str, info: ValidationInfo) -> str:
        # Without valid parameters (reported on their own) only the syntax is checked.
        problems = Problems()
        problems.extend((), check_condition(condition, info.data.get("params")))
        problems.raise_if_any()
        return condition


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _gates(values: list[str]) -> list[str]:
    problems = Problems()
    for index, gate in enumerate(values):
        problems.extend(index, check_gate(gate))
    problems.raise_if_any()
    return values


#: Expressions over the evaluated model's metrics and their history (`baseline`).
Gates = Annotated[list[Text], AfterValidator(_gates)]


class ValidationStage(SpecModel):
    """One stage: evaluate the best trial's model on `dataset` within `timeout`, then gate."""

    name: Name
    dataset: Text
    timeout: PositiveDuration
    #: May use `${{ hparams.<name> }}`: the best trial's values.
    command: Text = DEFAULT_EVALUATION_COMMAND
    #: Every gate must hold, e.g. `accuracy >= baseline - 0.01`, `loss <= baseline.loss`.
    gates: Gates = []

    @model_validator(mode="after")
    def _check_templates(self) -> ValidationStage:
        _raise_template_problems("command", self.command)
        return self


class Validation(SpecModel):
    """Ordered validation stages; the first failing stage stops the pipeline."""

    stages: Annotated[list[ValidationStage], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> Validation:
        problems = Problems()
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            if stage.name in seen:
                problems.add(("stages", index, "name"), f"stage {stage.name!r} is declared twice")
            seen.add(stage.name)
        problems.raise_if_any()
        return self


# ---------------------------------------------------------------------------------------------
# deployment, experiment, rollout
# ---------------------------------------------------------------------------------------------
class S3Destination(SpecModel):
    """Where packaged models go: `s3://bucket/prefix/<version>/<format>/...`."""

    type: Literal["s3"]
    path: Annotated[str, AfterValidator(_s3_url)]


Format = Literal["onnx", "torchscript", "tensorrt"]


class Deployment(SpecModel):
    """Package the chosen model into `formats` and register it at `destination`."""

    formats: Annotated[list[Format], Field(min_length=1)]
    destination: S3Destination
    #: Resolved: the registry's model name; defaults to the destination's last path segment.
    model: Name | None = None

    @model_validator(mode="after")
    def _resolve(self) -> Deployment:
        problems = Problems()
        for index, kind in enumerate(self.formats):
            if kind in self.formats[:index]:
                problems.add(("formats", index), f"{kind} is listed twice")
        model = self.model
        if model is None:
            segments = [s for s in S3Url.parse(self.destination.path).key.split("/") if s]
            model = segments[-1] if segments else None
            if model is None or not _NAME.fullmatch(model):
                problems.add(
                    "model",
                    "name the model (model: deepseek), or end destination.path with it "
                    "(s3://model-registry/deepseek/)",
                )
        problems.raise_if_any()
        return self.model_copy(update={"model": model})


class Variant(SpecModel):
    """A model version given a share of the traffic in an experiment."""

    version: Version
    traffic: Percentage


class Experiment(SpecModel):
    """An A/B test: variants take their traffic share, the control takes the rest."""

    control: Version
    variants: Annotated[list[Variant], Field(min_length=1)]
    metrics: Annotated[list[Metric], Field(min_length=1)]
    duration: PositiveDuration | None = None
    min_samples: Annotated[int, Field(ge=1)] | None = None

    @property
    def control_traffic(self) -> float:
        """The percent of traffic the control keeps."""
        return 100.0 - sum(variant.traffic for variant in self.variants)

    @model_validator(mode="after")
    def _check_split(self) -> Experiment:
        problems = Problems()
        versions = {self.control}
        for index, variant in enumerate(self.variants):
            if variant.version in versions:
                problems.add(
                    ("variants", index, "version"),
                    f"{variant.version} appears twice among the control and variants",
                )
            versions.add(variant.version)
            if variant.traffic <= 0:
                problems.add(("variants", index, "traffic"), "a variant needs some traffic")
        total = sum(variant.traffic for variant in self.variants)
        if total > 100:
            shares = " + ".join(f"{variant.traffic:g}%" for variant in self.variants)
            problems.add(
                "variants",
                f"the variants take {shares} = {total:g}% of the traffic; together they may "
                "take at most 100% (the control gets the rest)",
            )
        for index, metric in enumerate(self.metrics):
            if metric in self.metrics[:index]:
                problems.add(("metrics", index), f"{metric} is listed twice")
        problems.raise_if_any()
        return self


class Rollout(SpecModel):
    """How the new model replaces the serving one: blue-green, canary steps, or shadow."""

    strategy: Literal["blue-green", "canary", "shadow"]
    #: Canary only: the traffic share at each step, increasing; 100% follows the last step.
    steps: list[Percentage] = []
    #: How long each step (or the shadow phase, or the blue-green watch) lasts before analysis.
    interval: PositiveDuration = Duration.parse("10m")
    #: Gates over the new version's live metrics; `baseline.<metric>` is the serving version's.
    analysis: Gates = []

    @model_validator(mode="after")
    def _check_steps(self) -> Rollout:
        problems = Problems()
        if self.strategy == "canary" and not self.steps:
            problems.add("steps", "a canary rollout needs steps, e.g. [10%, 50%, 100%]")
        if self.strategy != "canary" and self.steps:
            problems.add("steps", f"steps apply to a canary rollout, not {self.strategy}")
        for index, step in enumerate(self.steps):
            if step <= 0:
                problems.add(("steps", index), "a step needs some traffic")
            elif index and step <= self.steps[index - 1]:
                problems.add(("steps", index), "each step must take more traffic than the last")
        problems.raise_if_any()
        return self


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------
_SECTIONS = ("training", "validation", "deployment", "experiment", "rollout")


class Pipeline(SpecModel):
    """A whole `.ciuicci.yaml`, validated and resolved."""

    name: Text | None = None
    triggers: list[GitPushTrigger] = []
    jobs: dict[Name, Job] = {}
    data: dict[Name, Annotated[Dataset, BeforeValidator(_dataset_shorthand)]] = {}
    training: Training | None = None
    alerts: list[AlertRule] = []
    validation: Validation | None = None
    deployment: Deployment | None = None
    experiment: Experiment | None = None
    rollout: Rollout | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_extension_keys(cls, data: Any, info: ValidationInfo) -> Any:
        note_model(info, data, cls)
        # Top-level `x-...` keys hold YAML anchors to reuse (`<<: *x-defaults`), as in Compose.
        if isinstance(data, dict) and any(str(k).startswith(EXTENSION_PREFIX) for k in data):
            return {k: v for k, v in data.items() if not str(k).startswith(EXTENSION_PREFIX)}
        return data

    @field_validator(*_SECTIONS, mode="before")
    @classmethod
    def _section_not_empty(cls, value: Any) -> Any:
        # `deployment:` with nothing under it is most often an indentation slip; say so.
        if value is None:
            raise ValueError("the section is empty: indent its keys under it, or remove it")
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_sections(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {k: v for k, v in dumped.items() if not (k in _SECTIONS and v is None)}

    @field_validator("jobs")
    @classmethod
    def _check_needs(cls, jobs: dict[str, Job]) -> dict[str, Job]:
        problems = Problems()
        for name, job in jobs.items():
            for index, need in enumerate(job.needs):
                where = (name, "needs", index)
                if need == name:
                    problems.add(where, f"job {name!r} cannot need itself")
                elif need not in jobs:
                    match = closest(need, jobs)
                    hint = f" (did you mean {match!r}?)" if match else ""
                    problems.add(
                        where,
                        f"{need!r} is not a job{hint}; jobs: {', '.join(jobs)}",
                    )
                elif need in job.needs[:index]:
                    problems.add(where, f"{need!r} is listed twice")
        for cycle in _cycles(jobs):
            first, second = cycle[0], cycle[1]
            problems.add(
                (first, "needs", jobs[first].needs.index(second)),
                f"jobs depend on each other in a cycle: {' -> '.join([*cycle, first])}",
            )
        problems.raise_if_any()
        return jobs

    @field_validator("data")
    @classmethod
    def _distinct_env_names(cls, data: dict[str, Dataset]) -> dict[str, Dataset]:
        problems = Problems()
        seen: dict[str, str] = {}
        for name in data:
            variable = data_env_name(name)
            if variable in seen:
                problems.add(
                    name,
                    f"{name!r} and {seen[variable]!r} would both be {variable} in the job; "
                    "rename one",
                )
            seen[variable] = name
        problems.raise_if_any()
        return data

    @field_validator("alerts")
    @classmethod
    def _name_alerts(cls, alerts: list[AlertRule]) -> list[AlertRule]:
        problems = Problems()
        taken: set[str] = set()
        for index, rule in enumerate(alerts):
            if rule.name is not None:
                if rule.name in taken:
                    problems.add((index, "name"), f"alert {rule.name!r} is declared twice")
                taken.add(rule.name)
        problems.raise_if_any()
        named = []
        for rule in alerts:
            if rule.name is None:
                base = re.sub(r"[^A-Za-z0-9_-]", "-", rule.metric).strip("-_") or "alert"
                name, number = base, 1
                while name in taken:
                    number += 1
                    name = f"{base}-{number}"
                taken.add(name)
                rule = rule.model_copy(update={"name": name})
            named.append(rule)
        return named

    @model_validator(mode="after")
    def _check_sections(self) -> Pipeline:
        problems = Problems()
        if not self.jobs and self.training is None:
            problems.add((), "the pipeline has nothing to run: add jobs or a training section")
        for section in ("validation", "deployment"):
            if getattr(self, section) is not None and self.training is None:
                problems.add(section, f"{section} needs a training section to produce a model")
        if self.rollout is not None and self.deployment is None:
            problems.add("rollout", "a rollout needs a deployment section (what to roll out)")
        declared = self.training.hyperparameter_names if self.training else []
        for name, job in self.jobs.items():
            for index, step in enumerate(job.steps):
                if isinstance(step, RunStep):
                    where: SpecPath = ("jobs", name, "steps", index, "run")
                    text = step.run
                else:
                    where = ("jobs", name, "steps", index, "cache", "key")
                    text = step.cache.key
                problems.extend(where, undeclared_hyperparameters(text, declared))
        for index, stage in enumerate(self.validation.stages if self.validation else []):
            problems.extend(
                ("validation", "stages", index, "command"),
                undeclared_hyperparameters(stage.command, declared),
            )
        problems.raise_if_any()
        return self


def data_env_name(name: str) -> str:
    """The variable that holds dataset `name`'s local path in a job: CIUIC_DATA_<NAME>."""
    return "CIUIC_DATA_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _cycles(jobs: dict[str, Job]) -> list[list[str]]:
    """Each cycle in `needs`, once, starting at its first job in file order."""
    order = {name: index for index, name in enumerate(jobs)}
    cycles: list[list[str]] = []
    reported: set[frozenset[str]] = set()
    done: set[str] = set()
    for root in jobs:
        if root in done:
            continue
        # An explicit stack: a hostile file may chain thousands of jobs.
        path: list[str] = [root]
        on_path = {root}
        pending = [iter(jobs[root].needs)]
        while pending:
            need = next(pending[-1], None)
            if need is None:
                pending.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
            elif need in on_path:
                cycle = path[path.index(need) :]
                if len(cycle) > 1 and frozenset(cycle) not in reported:
                    first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                    reported.add(frozenset(cycle))
                    cycles.append(cycle[first:] + cycle[:first])
            elif need in jobs and need not in done:
                path.append(need)
                on_path.add(need)
                pending.append(iter(jobs[need].needs))
    return cycles


#: Messages for the discriminated unions, computed from the rejected value.
KIND_MESSAGES: dict[str, Callable[[Any], str]] = {
    "step_kind": step_kind_message,
    "hyperparameter_kind": hyperparameter_kind_message,
    "action_kind": action_kind_message,
}
