"""Path and branch globs for trigger filters, with the semantics of git and GitHub Actions.

- `*` matches any run of characters except `/`; `?` matches one character except `/`.
- `**` matches any run of characters including `/`. At the start of a segment, `**/` matches
  zero or more whole directories: `**/*.py` matches `a.py` and `x/y/a.py`, `a/**/b` matches
  `a/b`. Elsewhere (`a**/b`) it is just any run, so that one needs a `/`.
- `[abc]`, `[a-z]`, `[!abc]`: one character in (or not in) the set, never `/`. A `-` at either
  end is a member; `]` and `-` can be escaped (`[\\]x]`); `[]` is an error.
- A backslash makes the next character literal; a leading `!` negates the pattern.
- A pattern matches the whole path (it is anchored); paths use `/`.

A list of patterns is read in order and the last pattern that matches a value decides, so
`["docs/**", "!docs/internal/**"]` selects `docs/a.md` but not `docs/internal/b.md`.

Patterns come from pushed pipeline files, so matching must not be able to stall the trigger
service: a backtracking regex takes polynomial time in the path for patterns like `*a*a*a*a*b`
(seconds at 80 characters). Patterns compile instead to a small automaton whose states are
built lazily and cached, which matches in time linear in the path whatever the pattern.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ciuic_common.errors import InvalidArgument

__all__ = [
    "Glob",
    "GlobError",
    "PathsDecision",
    "branch_matches",
    "matches_any",
    "select_paths",
]


class GlobError(InvalidArgument):
    """A malformed pattern; `offset` is 0-based into the pattern as written."""

    def __init__(self, message: str, pattern: str, offset: int | None = None) -> None:
        super().__init__(message, pattern, offset)
        self.message = message
        self.pattern = pattern
        self.offset = offset

    def __str__(self) -> str:
        if not self.pattern:
            return self.message
        where = "" if self.offset is None else f" at column {self.offset + 1}"
        return f"{self.message}{where} in pattern {json.dumps(self.pattern, ensure_ascii=False)}"


# --- compiling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One element of a compiled pattern, consuming characters for which `test` holds.

    `once`: exactly one character. `many`: any number of them (a star). `maybe`: consumes
    nothing, and either goes on to the next step or skips the `skip` steps after it.
    """

    kind: Literal["once", "many", "maybe"]
    test: Callable[[str], bool]
    skip: int = 0


def _not_slash(ch: str) -> bool:
    return ch != "/"


def _anything(ch: str) -> bool:
    return True


def _nothing(ch: str) -> bool:
    return False


def _literal(char: str) -> _Step:
    return _Step("once", char.__eq__)


_STAR = _Step("many", _not_slash)
_ANY_RUN = _Step("many", _anything)
_ONE = _Step("once", _not_slash)
# `**/` at the start of a segment: any run then a '/', or nothing at all.
_DIRS = (_Step("maybe", _nothing, skip=2), _ANY_RUN, _literal("/"))


def _class_member(pattern: str, i: int, opening: int) -> tuple[str, int]:
    if pattern[i] != "\\":
        return pattern[i], i + 1
    if i + 1 == len(pattern):
        raise GlobError("unterminated '['", pattern, opening)
    return pattern[i + 1], i + 2


def _char_class(pattern: str, opening: int) -> tuple[_Step, int]:
    """The step for the `[...]` starting at `opening`, and the offset just after it."""
    i = opening + 1
    negated = pattern.startswith("!", i)
    if negated:
        i += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if i == len(pattern):
            raise GlobError("unterminated '['", pattern, opening)
        if pattern[i] == "]":
            if not ranges:
                raise GlobError("empty character class", pattern, opening)
            break
        start = i
        low, i = _class_member(pattern, i, opening)
        high = low
        if pattern.startswith("-", i) and i + 1 < len(pattern) and pattern[i + 1] != "]":
            high, i = _class_member(pattern, i + 1, opening)
            if high < low:
                raise GlobError(f"range '{low}-{high}' is backwards", pattern, start)
        ranges.append((low, high))

    def test(ch: str) -> bool:
        return ch != "/" and any(low <= ch <= high for low, high in ranges) != negated

    return _Step("once", test), i + 1


def _steps(pattern: str) -> tuple[_Step, ...]:
    if not pattern:
        raise GlobError("a pattern cannot be empty", pattern)
    body = 1 if pattern.startswith("!") else 0
    if body == len(pattern):
        raise GlobError("'!' must be followed by a pattern", pattern, 0)
    steps: list[_Step] = []
    i = body
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == len(pattern):
                raise GlobError("pattern ends with a lone backslash", pattern, i)
            steps.append(_literal(pattern[i + 1]))
            i += 2
        elif pattern.startswith("**", i):
            at_segment_start = i == body or pattern[i - 1] == "/"
            if at_segment_start and pattern.startswith("/", i + 2):
                steps += _DIRS
                i += 3
            else:
                steps.append(_ANY_RUN)
                i += 2
        elif ch == "*":
            steps.append(_STAR)
            i += 1
        elif ch == "?":
            steps.append(_ONE)
            i += 1
        elif ch == "[":
            step, i = _char_class(pattern, i)
            steps.append(step)
        else:
            steps.append(_literal(ch))
            i += 1
    return tuple(steps)


class _Matcher:
    """A lazily built DFA over the NFA whose states are positions in `steps`."""

    _MAX_CACHED = 4096  # transitions kept per pattern; beyond that they are recomputed

    def __init__(self, steps: tuple[_Step, ...]) -> None:
        self.steps = steps
        self.start = self.closure([0])
        self.transitions: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        """The states reachable without consuming a character."""
        seen: set[int] = set()
        pending = list(states)
        while pending:
            state = pending.pop()
            if state in seen:
                continue
            seen.add(state)
            if state < len(self.steps):
                step = self.steps[state]
                if step.kind in ("many", "maybe"):
                    pending.append(state + 1)
                if step.kind == "maybe":
                    pending.append(state + 1 + step.skip)
        return frozenset(seen)

    def advance(self, states: frozenset[int], ch: str) -> frozenset[int]:
        """The states after consuming `ch`."""
        key = (states, ch)
        cached = self.transitions.get(key)
        if cached is not None:
            return cached
        following = []
        for state in states:
            if state < len(self.steps) and self.steps[state].test(ch):
                following.append(state + 1 if self.steps[state].kind == "once" else state)
        result = self.closure(following)
        if len(self.transitions) < self._MAX_CACHED:
            self.transitions[key] = result
        return result

    def matches(self, value: str) -> bool:
        states = self.start
        for ch in value:
            states = self.advance(states, ch)
            if not states:
                return False
        return len(self.steps) in states


@functools.lru_cache(maxsize=1024)
def _matcher(pattern: str) -> _Matcher:
    return _Matcher(_steps(pattern))


# --- public API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Glob:
    """A validated pattern as written (`!` included); `negated` says whether it starts with `!`."""

    pattern: str
    negated: bool = field(init=False)
    _matcher: _Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "negated", self.pattern.startswith("!"))
        object.__setattr__(self, "_matcher", _matcher(self.pattern))

    @classmethod
    def compile(cls, pattern: str) -> Glob:
        """The glob for `pattern`; raises GlobError when it is malformed."""
        return cls(pattern)

    def matches(self, path: str) -> bool:
        """Whether the pattern's body matches the whole of `path`, ignoring any negation."""
        return self._matcher.matches(path)


def _compile_all(patterns: Sequence[str]) -> list[Glob]:
    if isinstance(patterns, str):  # a str is a Sequence[str] too, of one-letter patterns
        raise TypeError("patterns must be a list of strings, not one string")
    return [Glob.compile(pattern) for pattern in patterns]


def _selected(globs: Sequence[Glob], value: str) -> bool:
    if not globs:
        return True
    selected = False
    for glob in globs:
        if glob.matches(value):
            selected = not glob.negated
    return selected


def matches_any(patterns: Sequence[str], value: str) -> bool:
    """Whether the last pattern matching `value` is positive; an empty list selects everything."""
    return _selected(_compile_all(patterns), value)


def branch_matches(patterns: Sequence[str], branch: str) -> bool:
    """Whether a branch passes a `branches` filter; an empty list allows every branch."""
    return matches_any(patterns, branch)


@dataclass(frozen=True)
class PathsDecision:
    """Whether a push passes a `paths` filter, the files that made it pass, and why, in words."""

    matched: bool
    files: tuple[str, ...]
    reason: str


def _listing(items: Sequence[str], limit: int = 5) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:3])} and {len(items) - 3} more"


def select_paths(patterns: Sequence[str], changed_files: Sequence[str]) -> PathsDecision:
    """Which changed files a `paths` filter selects; the push matches when any file is selected."""
    globs = _compile_all(patterns)
    changed = tuple(changed_files)
    if not globs:
        return PathsDecision(True, changed, "no paths filter, so every change counts")
    shown = json.dumps(list(patterns), ensure_ascii=False)
    files = tuple(path for path in changed if _selected(globs, path))
    if not changed:
        return PathsDecision(False, (), f"no files changed, so none matches paths {shown}")
    if not files:
        reason = f"no changed file matches paths {shown} (changed: {_listing(changed)})"
        return PathsDecision(False, (), reason)
    noun = "file" if len(changed) == 1 else "files"
    verb = "matches" if len(files) == 1 else "match"
    reason = f"{len(files)} of {len(changed)} changed {noun} {verb}: {_listing(files)}"
    return PathsDecision(True, files, reason)
