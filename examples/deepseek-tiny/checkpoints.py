"""Checkpoint files: `step-NNNNNNN.pt` in a directory, written atomically, newest wins.

A checkpoint holds everything to continue exactly where training stopped: the model's and the
optimizer's state, the step, both configs, the RNG states and the last metrics. It is written to
a temporary name and renamed, so a reader (or the agent's uploader) never sees half a file; the
oldest are then removed, keeping `keep` of them (0: all).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "find", "load", "save"]

#: Written into every checkpoint, and checked when one is read.
FORMAT = "deepseek-tiny/1"
_NAME = re.compile(r"step-(\d+)\.pt")


class CheckpointError(Exception):
    """A checkpoint that cannot be read as this example's."""


def save(directory: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (with its `step`) as the newest checkpoint in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{state['step']:07d}.pt"
    partial = path.with_name(f".{path.name}.partial")
    torch.save({"format": FORMAT, **state}, partial)
    os.replace(partial, path)
    if keep > 0:
        for old in _by_step(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def find(path: Path) -> Path | None:
    """The checkpoint at `path`: the file itself, or a directory's highest step; None if none."""
    if path.is_file():
        return path
    if path.is_dir():
        found = _by_step(path) or _by_step(path / "checkpoints")
        return found[-1] if found else None
    return None


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint file (tensors on the CPU; no code from the file is run)."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises anything from pickle errors to RuntimeError
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    return state


def _by_step(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]
