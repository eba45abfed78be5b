"""Weighted fair share between projects: who has used less than their share of GPU time.

A project's usage is the GPU-seconds its jobs have run, decayed exponentially with a half-life:
a GPU-second used one half-life ago counts half, two half-lives ago a quarter. Decay (rather than
a fixed window) forgets the past smoothly, so a project's standing never jumps when an old job
leaves the window, and it can be carried forward exactly from one number per project: while a
project runs `g` GPUs, its usage `U` after `dt` seconds is

    U * 2**(-dt/h) + g * h/ln 2 * (1 - 2**(-dt/h))

Projects are ordered by usage divided by their share weight, least first; with weights 3:1 and
both saturating the cluster, the first gets three GPU-seconds for every one of the second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ciuic_common.errors import InvalidArgument

__all__ = ["DEFAULT_HALF_LIFE_S", "FairShare", "Usage"]

#: A week, as Slurm's PriorityDecayHalfLife: long enough that a burst is remembered for days.
DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class FairShare:
    """How GPU time is shared: each project's weight and how fast past usage is forgotten."""

    weights: Mapping[str, float] = field(default_factory=dict)
    half_life_s: float = DEFAULT_HALF_LIFE_S
    #: The weight of a project that `weights` does not name.
    default_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise InvalidArgument(f"the usage half-life must be positive, not {self.half_life_s}")
        for project, weight in (*self.weights.items(), ("(default)", self.default_weight)):
            if not (weight > 0 and math.isfinite(weight)):
                raise InvalidArgument(
                    f"the share weight of {project} must be positive, not {weight}"
                )

    def weight(self, project: str) -> float:
        """The share weight of `project`."""
        return self.weights.get(project, self.default_weight)

    def decay(self, elapsed_s: float) -> float:
        """The factor by which usage shrinks over `elapsed_s` seconds."""
        return math.exp2(-max(elapsed_s, 0.0) / self.half_life_s)

    def accrued(self, gpus: int, elapsed_s: float) -> float:
        """Decayed GPU-seconds that `gpus` GPUs add over `elapsed_s` seconds (`inf`: forever)."""
        return gpus * self.half_life_s / math.log(2) * (1.0 - self.decay(elapsed_s))

    def expected_charge(self, gpus: int, runtime_estimate_s: float | None) -> float:
        """Usage a job placed now is expected to add; a job of unknown length may run forever."""
        return self.accrued(gpus, math.inf if runtime_estimate_s is None else runtime_estimate_s)


@dataclass(frozen=True, slots=True)
class Usage:
    """A project's decayed GPU-seconds as of `as_of`, and the GPUs it has run since then."""

    gpu_seconds: float = 0.0
    running_gpus: int = 0
    as_of: float = 0.0

    def at(self, now: float, share: FairShare) -> float:
        """Decayed GPU-seconds at `now` (a `now` before `as_of` counts as `as_of`)."""
        elapsed = now - self.as_of
        return self.gpu_seconds * share.decay(elapsed) + share.accrued(self.running_gpus, elapsed)

    def settled(self, now: float, share: FairShare, running_gpus_change: int = 0) -> Usage:
        """This usage carried forward to `now`, after which `running_gpus_change` GPUs start."""
        return Usage(
            gpu_seconds=self.at(now, share),
            running_gpus=self.running_gpus + running_gpus_change,
            as_of=max(now, self.as_of),
        )
