"""The training text: a synthetic corpus generated from a small grammar, the same on every run.

Licence: the grammar, word lists and generated text are written for this example and are part
of the ciuic repository under its licence; no third-party text is used. There is nothing to
download.

Four kinds of line, each teaching the model something it can learn in a minute:

- facts that never change ("the owl lives in the barn and eats mice.") - memorisation;
- scenes with free choices ("mia paints the green kite near the river.") - grammar, and a
  floor on the loss where the words are truly random;
- sums with their answers ("17 + 25 = 42.") - arithmetic on digits;
- counts ("count: 4 5 6 7 8.") - a rule to carry on.

Splits: every tenth line (by position in the generated sequence) is validation, the rest is
training. `small` is the first eighth of the validation lines (a quick check), `full` all of
them. `python corpus.py DIR` writes the splits as text files (to version them as a dataset).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

__all__ = ["LINES", "SEED", "SPLITS", "generate_lines", "split_bytes", "split_text"]

#: Lines generated; about 170 kB of text.
LINES = 6000
SEED = 1234
SPLITS = ("train", "small", "full")

# Each animal's home and food never change: facts to memorise.
_FACTS = {
    "cat": ("house", "fish"),
    "dog": ("yard", "bones"),
    "owl": ("barn", "mice"),
    "cow": ("field", "grass"),
    "bee": ("hive", "nectar"),
    "fox": ("den", "eggs"),
    "duck": ("pond", "bread"),
    "horse": ("stable", "hay"),
}
_NAMES = ("mia", "leo", "ada", "sam", "noor", "ivan", "yuki", "tom")
_VERBS = ("sees", "paints", "finds", "carries", "drops", "wants")
_COLOURS = ("red", "green", "blue", "small", "old", "bright")
_THINGS = ("ball", "kite", "box", "book", "cup", "hat")
_PREPOSITIONS = ("near", "under", "behind", "beside")
_PLACES = ("river", "bridge", "tree", "school", "market", "hill")


def _line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        animal = rng.choice(sorted(_FACTS))
        home, food = _FACTS[animal]
        return f"the {animal} lives in the {home} and eats {food}."
    if kind == 1:
        return (
            f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_COLOURS)} "
            f"{rng.choice(_THINGS)} {rng.choice(_PREPOSITIONS)} the {rng.choice(_PLACES)}."
        )
    if kind == 2:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a} + {b} = {a + b}."
    start = rng.randrange(1, 20)
    return "count: " + " ".join(str(n) for n in range(start, start + rng.randrange(4, 8))) + "."


def generate_lines(count: int = LINES, seed: int = SEED) -> list[str]:
    """The corpus, one sentence per line; the same for the same arguments on any machine."""
    rng = random.Random(seed)
    return [_line(rng) for _ in range(count)]


def split_text(split: str) -> str:
    """The text of a built-in split: train, small or full (validation)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the built-in splits are {', '.join(SPLITS)}")
    lines = generate_lines()
    if split == "train":
        chosen = [line for index, line in enumerate(lines) if index % 10]
    else:
        chosen = lines[::10]
        if split == "small":
            chosen = chosen[: len(chosen) // 8]
    return "\n".join(chosen) + "\n"


def split_bytes(split: str) -> bytes:
    """The tokens of a built-in split: its UTF-8 bytes."""
    return split_text(split).encode("utf-8")


def main(argv: list[str]) -> int:
    """Write every split to DIR/<split>.txt."""
    if len(argv) != 1:
        print("usage: python corpus.py DIR   (writes DIR/train.txt, small.txt, full.txt)")
        return 2
    target = Path(argv[0])
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "small", "full"):
        path = target / f"{split}.txt"
        path.write_text(split_text(split), encoding="utf-8")
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
