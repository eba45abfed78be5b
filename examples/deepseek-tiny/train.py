"""Train the tiny DeepSeek-style model on the synthetic corpus, alone or under torchrun (DDP).

    python train.py                                    # defaults, ./outputs
    python train.py --steps 50 --set learning_rate=0.001
    torchrun --nproc_per_node 2 train.py               # DDP over gloo on the CPU

Settings, later ones winning: the defaults below, the JSON file at `$CIUIC_HPARAMS` (or
`--hparams FILE`), then `--steps` and `--set KEY=VALUE`. A key is a TrainConfig or ModelConfig
field; an unknown key is an error. `batch_size` is sequences per process per step.

Inside a ciuic job it reads `CIUIC_HPARAMS`, `CIUIC_OUTPUT_DIR`, `CIUIC_INIT_CHECKPOINT` and
torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`LOCAL_WORLD_SIZE`; rank 0 logs `training_loss`,
`learning_rate` and `tokens_per_s` every `log_every` steps, `validation_loss` and `accuracy`
every `eval_every` steps and at the end, and writes `checkpoints/step-NNNNNNN.pt` every
`checkpoint_every` steps and at the end, then `summary.json`.

SIGTERM or SIGINT: every process finishes its step, rank 0 writes a checkpoint, and the
processes exit with 128 + the signal's number (143 for SIGTERM). A later run with
`CIUIC_INIT_CHECKPOINT` pointing at the checkpoints continues at that step, with the same
batches and the same losses as if it had never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

# isort: split
# The example's own modules (this directory is on sys.path when a script runs).
import checkpoints
from corpus import split_bytes
from evaluate import Measurement, measure, tokens_of
from model import DeepSeekTiny, ModelConfig, route_bias_step
from reporting import report

__all__ = ["Settings", "TrainConfig", "TrainResult", "load_settings", "main", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Every field can be set as a hyperparameter of the same name."""

    learning_rate: float = 3e-3
    #: Sequences per process per step.
    batch_size: int = 16
    steps: int = 80
    seq_len: int = 64
    warmup_steps: int = 10
    #: The cosine schedule ends at learning_rate x this.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    #: Weight of the sequence-wise balance loss (the routing bias does most of the balancing).
    aux_loss_weight: float = 1e-3
    seed: int = 0
    log_every: int = 5
    eval_every: int = 20
    #: Validation tokens evaluated during training (the start of the `full` split).
    eval_tokens: int = 8192
    checkpoint_every: int = 40
    #: Checkpoint files kept in checkpoints/ (0: all).
    keep_checkpoints: int = 1
    #: CPU threads per process; 0: $OMP_NUM_THREADS, else the CPUs over this node's processes.
    num_threads: int = 0


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know."""

    train: TrainConfig
    model: ModelConfig
    #: The model fields the settings named (a checkpoint's model must agree with them).
    model_overrides: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TrainResult:
    """How a run ended (rank 0's view; other ranks see the same step and exit code)."""

    step: int
    exit_code: int
    history: list[dict[str, float]]
    checkpoint: Path | None


# --- settings --------------------------------------------------------------------------------
def _coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type; text from --set is parsed, bools are never numbers."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif not isinstance(value, bool):
        try:
            if kind == "int":
                number = float(value) if isinstance(value, str) else value
                if isinstance(number, int | float) and float(number).is_integer():
                    return int(number)
            elif kind == "float" and isinstance(value, int | float | str):
                return float(value)
        except ValueError:
            pass
    raise ValueError(f"hyperparameter {name}: {value!r} is not a valid {kind}")


def load_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from hyperparameter values over the defaults; unknown names are errors."""
    train_fields = {f.name: str(f.type) for f in fields(TrainConfig)}
    model_fields = {f.name: str(f.type) for f in fields(ModelConfig)}
    unknown = sorted(set(values) - set(train_fields) - set(model_fields))
    if unknown:
        known = ", ".join(sorted({*train_fields, *model_fields}))
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {known}")
    train_values = {
        k: _coerce(k, train_fields[k], v) for k, v in values.items() if k in train_fields
    }
    model_values = {
        k: _coerce(k, model_fields[k], v) for k, v in values.items() if k in model_fields
    }
    train = TrainConfig(**train_values)
    if train.steps < 1 or train.batch_size < 1 or train.learning_rate <= 0:
        raise ValueError("steps, batch_size and learning_rate must be positive")
    model = ModelConfig(**model_values)
    if train.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {train.seq_len} is longer than max_seq_len {model.max_seq_len}")
    return Settings(train, model, frozenset(model_values))


# --- distributed -----------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0


def join_world() -> World:
    """Join the process group when torchrun started us (RANK set), else train alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or size == 1:
        return World()
    dist.init_process_group("gloo")
    return World(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    )


def _threads(config: TrainConfig, world: World) -> int:
    if config.num_threads > 0:
        return config.num_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // world.local_size)


class StopRequest:
    """Remembers SIGTERM/SIGINT; the loop stops at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum


# --- training --------------------------------------------------------------------------------
def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio (a function of the step only)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def batch_at(
    tokens: torch.Tensor, step: int, rank: int, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, rank), drawn from a generator seeded by them alone: a resumed
    run sees the batches the stopped one would have seen, with no data-loader state to keep."""
    seed = ((config.seed * 1_000_003 + step) * 4_099 + rank) % (2**63)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(
        0, len(tokens) - config.seq_len - 1, (config.batch_size,), generator=generator
    )
    windows = tokens[starts[:, None] + torch.arange(config.seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def _validate(
    model: DeepSeekTiny, tokens: torch.Tensor, config: TrainConfig, world: World
) -> Measurement:
    mine = measure(model, tokens, config.seq_len, rank=world.rank, world=world.size)
    if world.size == 1:
        return mine
    sums = torch.tensor([mine.loss_sum, mine.correct, mine.count], dtype=torch.float64)
    dist.all_reduce(sums)
    return Measurement(sums[0].item(), int(sums[1].item()), int(sums[2].item()))


def _checkpoint_state(
    step: int,
    model: DeepSeekTiny,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    return {
        "step": step,
        "model_config": model.cfg.to_dict(),
        "train_config": asdict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "metrics": dict(metrics),
    }


def _resume_from(init: Path | None, settings: Settings, world: World) -> dict[str, Any] | None:
    if init is None:
        return None
    path = checkpoints.find(init)
    if path is None:
        if world.is_main:
            print(f"no checkpoint at {init}: starting from step 0", file=sys.stderr)
        return None
    state = checkpoints.load(path)
    saved = ModelConfig(**state["model_config"])
    clash = [k for k in settings.model_overrides if getattr(saved, k) != getattr(settings.model, k)]
    if clash:
        raise ValueError(
            f"{path} holds a model with {', '.join(f'{k}={getattr(saved, k)}' for k in clash)}; "
            "the settings ask for another shape"
        )
    if world.is_main:
        print(f"resuming from {path} at step {state['step']}")
    return state


def train(
    settings: Settings,
    output_dir: Path,
    init_checkpoint: Path | None = None,
    world: World | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train to `settings.train.steps` (or until `stop` is requested); rank 0 reports."""
    world = world or World()
    stop = stop or StopRequest()
    config = settings.train
    torch.set_num_threads(_threads(config, world))
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    resumed = _resume_from(init_checkpoint, settings, world)
    model_config = ModelConfig(**resumed["model_config"]) if resumed else settings.model
    model = DeepSeekTiny(model_config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    step = 0
    last_metrics: dict[str, float] = {}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng"]["torch"])
        random.setstate(resumed["rng"]["python"])
        step = int(resumed["step"])
        last_metrics = dict(resumed.get("metrics", {}))
    network: torch.nn.Module = model
    if world.size > 1:
        # Routing biases change identically on every rank (loads are summed first), so buffers
        # need no broadcast; every expert runs each step, so no parameter goes unused.
        network = DistributedDataParallel(model, forward_sync_buffers=False)
    all_reduce = dist.all_reduce if world.size > 1 else None

    train_tokens = tokens_of(split_bytes("train"))
    valid_tokens = tokens_of(split_bytes("full"))[: config.eval_tokens + 1]
    directory = output_dir / "checkpoints"
    history: list[dict[str, float]] = []
    written: Path | None = None
    if world.is_main:
        total, active = model.count_parameters()
        print(
            f"deepseek-tiny: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
            f"{world.size} process(es) x {torch.get_num_threads()} thread(s), "
            f"steps {step}->{config.steps}, batch {config.batch_size}x{config.seq_len} per process",
            flush=True,
        )

    def save() -> Path | None:
        if not world.is_main:
            return None
        state = _checkpoint_state(step, model, optimizer, config, last_metrics)
        return checkpoints.save(directory, state, config.keep_checkpoints)

    def validate() -> None:
        result = _validate(model, valid_tokens, config, world)
        point = {"validation_loss": result.loss, "accuracy": result.accuracy}
        if world.is_main:
            report(point, step=step)
        history.append({"step": step, **point})
        last_metrics.update(point)

    if step == 0:
        validate()  # where the curve starts: about ln(256) = 5.5, nothing learned
    model.train()
    step_seconds, step_tokens, loss_sum, loss_count = 0.0, 0, 0.0, 0
    exit_code = 0
    while step < config.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        inputs, targets = batch_at(train_tokens, step, world.rank, config)
        logits = network(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        (loss + config.aux_loss_weight * model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        route_bias_step(model, all_reduce)
        step += 1
        # One small collective per step: the mean loss for the log, and whether any process
        # was asked to stop, so that all of them stop after the same step.
        shared = torch.tensor([loss.item(), 1.0 if stop.signal is not None else 0.0])
        if all_reduce is not None:
            all_reduce(shared)
        step_seconds += time.perf_counter() - started
        step_tokens += inputs.numel() * world.size
        loss_sum += shared[0].item() / world.size
        loss_count += 1
        stopping = shared[1].item() > 0
        if step % config.log_every == 0 or step == config.steps or stopping:
            point = {
                "training_loss": loss_sum / loss_count,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "tokens_per_s": step_tokens / step_seconds,
            }
            if world.is_main:
                report(point, step=step)
            history.append({"step": step, **point})
            last_metrics.update(point)
            step_seconds, step_tokens, loss_sum, loss_count = 0.0, 0, 0.0, 0
        if step % config.eval_every == 0 or step == config.steps:
            validate()
        if stopping:
            written = save()
            signum = stop.signal or signal.SIGTERM
            if world.is_main:
                print(
                    f"stopped by signal {signum} after step {step}; checkpoint {written}",
                    flush=True,
                )
            exit_code = 128 + signum
            break
        if step % config.checkpoint_every == 0 or step == config.steps:
            written = save()
    if exit_code == 0 and written is None and world.is_main and step >= config.steps:
        written = save()  # resumed at or past the last step: the checkpoint still names it
    if world.is_main:
        summary = {
            "step": step,
            "exit_code": exit_code,
            **last_metrics,
            "checkpoint": str(written) if written else None,
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return TrainResult(step, exit_code, history, written)


# --- command line ----------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hparams", help="JSON file of hyperparameters (default: $CIUIC_HPARAMS)")
    parser.add_argument("--steps", type=int, help="train to this step")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting, e.g. --set learning_rate=0.001 (repeatable)",
    )
    parser.add_argument("--output-dir", help="default: $CIUIC_OUTPUT_DIR, else ./outputs")
    parser.add_argument(
        "--init-checkpoint",
        help="checkpoint file or directory to resume (default: $CIUIC_INIT_CHECKPOINT)",
    )
    return parser.parse_args(argv)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    hparams = args.hparams or os.environ.get("CIUIC_HPARAMS")
    if hparams:
        loaded = json.loads(Path(hparams).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{hparams}: hyperparameters must be a JSON object")
        values.update(loaded)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write KEY=VALUE")
        values[key.strip()] = value.strip()
    if args.steps is not None:
        values["steps"] = args.steps
    return values


def main(argv: list[str] | None = None) -> int:
    """Run training from the command line; the exit code is the run's."""
    stop = StopRequest()
    stop.install()
    args = _parse(argv)
    try:
        settings = load_settings(_values(args))
    except (ValueError, OSError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir or os.environ.get("CIUIC_OUTPUT_DIR") or "outputs")
    init = args.init_checkpoint or os.environ.get("CIUIC_INIT_CHECKPOINT")
    world = join_world()
    try:
        result = train(settings, output_dir, Path(init) if init else None, world, stop)
    except (ValueError, checkpoints.CheckpointError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if world.size > 1:
            # Leave together: a rank tearing gloo down while rank 0 still writes its checkpoint
            # can abort ("terminate called without an active exception").
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
