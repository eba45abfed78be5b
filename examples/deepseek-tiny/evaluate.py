"""Evaluate a checkpoint: next-token loss, accuracy and perplexity on a text.

The validation stages' command. The checkpoint is `--checkpoint` or `$CIUIC_INIT_CHECKPOINT`
(the best trial's `checkpoints/` directory: its highest step is used). The text is, first found:

1. `--data PATH` (a file, or a directory whose files are read in name order);
2. `$CIUIC_DATA_<NAME>` for `--dataset NAME` (the platform's copy of the stage's dataset);
3. the built-in split `--split small|full` (see corpus.py).

Logs `validation_loss`, `accuracy` and `perplexity` through the SDK at the checkpoint's step,
prints them as one JSON line, and writes them to `$CIUIC_OUTPUT_DIR/evaluation.json` when set.

    python evaluate.py --checkpoint outputs/checkpoints --split full
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# isort: split
# The example's own modules (this directory is on sys.path when a script runs).
import checkpoints
from corpus import SPLITS, split_bytes
from model import DeepSeekTiny, ModelConfig
from reporting import report

__all__ = ["Measurement", "main", "measure", "resolve_text", "tokens_of"]


@dataclass(frozen=True)
class Measurement:
    """Sums over the predicted tokens; add them across processes before dividing."""

    loss_sum: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token (nats)."""
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        """Share of tokens whose most likely prediction is the true next token."""
        return self.correct / self.count

    def metrics(self) -> dict[str, float]:
        """What the validation stages gate on."""
        return {
            "validation_loss": self.loss,
            "accuracy": self.accuracy,
            "perplexity": math.exp(min(self.loss, 50.0)),
        }


def tokens_of(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D tensor of token ids."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@torch.no_grad()
def measure(
    model: DeepSeekTiny,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int = 32,
    rank: int = 0,
    world: int = 1,
) -> Measurement:
    """Predict every token after the first, in windows of `seq_len`; this process's share.

    Windows do not overlap; window i belongs to process i % world.
    """
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of {seq_len}")
    mine = torch.arange(rank, windows, world)
    offsets = torch.arange(seq_len + 1)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(mine), batch_size):
            chunk = tokens[mine[start : start + batch_size, None] * seq_len + offsets]
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            logits = model(inputs)
            flat = logits.reshape(-1, logits.shape[-1])
            loss_sum += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()
            correct += int((flat.argmax(-1) == targets.reshape(-1)).sum())
            count += targets.numel()
    finally:
        model.train(was_training)
    return Measurement(loss_sum, correct, count)


def _env_name(dataset: str) -> str:
    # As the agent names it: runs of other characters become one '_'.
    return "CIUIC_DATA_" + re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_").upper()


def _read(path: Path) -> bytes:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no files")
        return b"".join(p.read_bytes() for p in files)
    return path.read_bytes()


def resolve_text(data: str | None, dataset: str | None, split: str) -> tuple[bytes, str]:
    """The text to evaluate on, and where it came from (see the module's docstring)."""
    if data:
        return _read(Path(data)), data
    if dataset:
        variable = _env_name(dataset)
        location = os.environ.get(variable)
        if location:
            return _read(Path(location)), f"{dataset} ({variable}={location})"
        print(
            f"dataset {dataset}: {variable} is not set (no dataset version on this run); "
            f"evaluating on the built-in split {split!r}",
            file=sys.stderr,
        )
    return split_bytes(split), f"built-in split {split!r}"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", help="a checkpoint file or directory (default: $CIUIC_INIT_CHECKPOINT)"
    )
    parser.add_argument("--dataset", help="the stage's dataset name: read $CIUIC_DATA_<NAME>")
    parser.add_argument("--data", help="a text file or directory to evaluate on")
    parser.add_argument(
        "--split",
        choices=[s for s in SPLITS if s != "train"],
        default="full",
        help="the built-in split when no data is given (default: full)",
    )
    parser.add_argument("--seq-len", type=int, help="window length (default: the training's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Evaluate and report; 0 on success, 1 when the checkpoint or data cannot be read."""
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    location = args.checkpoint or os.environ.get("CIUIC_INIT_CHECKPOINT")
    if not location:
        print("no checkpoint: pass --checkpoint or set CIUIC_INIT_CHECKPOINT", file=sys.stderr)
        return 2
    path = checkpoints.find(Path(location))
    if path is None:
        print(f"no checkpoint (step-*.pt) at {location}", file=sys.stderr)
        return 1
    try:
        state = checkpoints.load(path)
        text, source = resolve_text(args.data, args.dataset, args.split)
    except (checkpoints.CheckpointError, OSError) as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 1
    model = DeepSeekTiny(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    seq_len = args.seq_len or int(state["train_config"]["seq_len"])
    started = time.perf_counter()
    result = measure(model, tokens_of(text), seq_len, args.batch_size)
    seconds = time.perf_counter() - started
    metrics = result.metrics()
    step = int(state["step"])
    print(f"evaluating {path} (step {step}) on {source}: {result.count} tokens in {seconds:.1f} s")
    report(metrics, step=step)
    summary = {
        "checkpoint": str(path),
        "step": step,
        "data": source,
        "tokens": result.count,
        **metrics,
    }
    print(json.dumps(summary))
    output = os.environ.get("CIUIC_OUTPUT_DIR")
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
