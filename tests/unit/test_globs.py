"""Path and branch globs of trigger filters: what each pattern matches, and how lists decide."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ciuic_common.errors import InvalidArgument
from ciuic_common.globs import (
    Glob,
    GlobError,
    PathsDecision,
    branch_matches,
    matches_any,
    select_paths,
)

properties = settings(max_examples=500, deadline=None)

SEED_PATHS = ["deepseek/**", "requirements.txt"]


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("deepseek/**", "deepseek/a.py", True),
        ("deepseek/**", "deepseek/x/y.py", True),
        ("deepseek/**", "deepseek", False),
        ("deepseek/**", "other/deepseek/a.py", False),
        ("requirements.txt", "requirements.txt", True),
        ("requirements.txt", "sub/requirements.txt", False),
        ("README.md", "readme.md", False),
        ("**/*.py", "a.py", True),
        ("**/*.py", "x/y/a.py", True),
        ("**/*.py", "x/y/a.pyc", False),
        ("*.py", "a.py", True),
        ("*.py", "x/a.py", False),
        ("**.py", "x/a.py", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/xb", False),
        ("a**/b", "ab", False),  # `**/` skips whole directories only at the start of a segment
        ("a**/b", "ax/y/b", True),
        ("**", "anything/at/all", True),
        ("**", "", True),
        ("docs/*", "docs/a.md", True),
        ("docs/*", "docs/a/b.md", False),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("a?b", "a/b", False),
        ("[abc].py", "b.py", True),
        ("[abc].py", "d.py", False),
        ("[a-c]x", "cx", True),
        ("[!a-c]x", "dx", True),
        ("[!a-c]x", "ax", False),
        ("[!a-c]x", "/x", False),
        ("a[/]b", "a/b", False),
        ("[-a]", "-", True),
        ("[a-]", "-", True),
        ("[\\]]", "]", True),
        ("\\*.py", "*.py", True),
        ("\\*.py", "a.py", False),
        ("\\[a]", "[a]", True),
        ("\\!important", "!important", True),
        ("!docs/**", "docs/a.md", True),  # .matches ignores the negation
    ],
)
def test_a_glob_matches_whole_paths(pattern: str, path: str, expected: bool) -> None:
    assert Glob.compile(pattern).matches(path) is expected


def test_a_glob_keeps_the_pattern_as_written() -> None:
    glob = Glob.compile("!docs/internal/**")
    assert (glob.pattern, glob.negated) == ("!docs/internal/**", True)
    assert Glob.compile("docs/**").negated is False
    assert Glob.compile("docs/**") == Glob("docs/**")
    assert len({Glob.compile("a"), Glob.compile("a"), Glob.compile("!a")}) == 2


@pytest.mark.parametrize(
    ("pattern", "message", "offset"),
    [
        ("", "a pattern cannot be empty", None),
        ("!", "'!' must be followed by a pattern", 0),
        ("src/[abc", "unterminated '['", 4),
        ("[a\\", "unterminated '['", 0),
        ("a\\", "pattern ends with a lone backslash", 1),
        ("[]", "empty character class", 0),
        ("![!]", "empty character class", 1),
        ("x[z-a]", "range 'z-a' is backwards", 2),
    ],
)
def test_a_malformed_pattern_is_refused(pattern: str, message: str, offset: int | None) -> None:
    with pytest.raises(GlobError) as error:
        Glob.compile(pattern)
    assert error.value.message == message
    assert error.value.offset == offset
    assert isinstance(error.value, InvalidArgument)


def test_a_glob_error_says_what_and_where() -> None:
    with pytest.raises(GlobError) as error:
        matches_any(["docs/**", "src/[abc"], "docs/a.md")
    assert str(error.value) == "unterminated '[' at column 5 in pattern \"src/[abc\""


def test_a_list_is_decided_by_the_last_matching_pattern() -> None:
    patterns = ["docs/**", "!docs/internal/**", "docs/internal/public.md"]
    assert matches_any(patterns, "docs/a.md")
    assert not matches_any(patterns, "docs/internal/b.md")
    assert matches_any(patterns, "docs/internal/public.md")
    assert not matches_any(patterns, "src/a.py")


def test_negations_alone_select_nothing_and_no_patterns_select_everything() -> None:
    assert not matches_any(["!README.md"], "README.md")
    assert not matches_any(["!README.md"], "src/a.py")
    assert matches_any([], "anything")


def test_one_string_is_not_a_list_of_patterns() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        matches_any("docs/**", "docs/a.md")


@pytest.mark.parametrize(
    ("patterns", "branch", "expected"),
    [
        (["main"], "main", True),
        (["main"], "main2", False),
        (["main"], "feature/main", False),
        (["main", "release/*"], "release/1.0", True),
        (["main", "release/*"], "release/1.0/hotfix", False),
        (["release/**"], "release/1.0/hotfix", True),
        (["feature/**", "!feature/wip-*"], "feature/wip-x", False),
        (["feature/**", "!feature/wip-*"], "feature/x", True),
        (["**", "!main"], "main", False),
        ([], "any/branch", True),
    ],
)
def test_branch_filters(patterns: list[str], branch: str, expected: bool) -> None:
    assert branch_matches(patterns, branch) is expected


def test_a_push_that_touches_none_of_the_seed_paths_is_skipped_with_the_reason() -> None:
    assert select_paths(SEED_PATHS, ["README.md"]) == PathsDecision(
        matched=False,
        files=(),
        reason='no changed file matches paths ["deepseek/**", "requirements.txt"] '
        "(changed: README.md)",
    )


def test_a_push_that_touches_the_seed_paths_lists_the_files() -> None:
    changed = ["deepseek/model.py", "README.md", "requirements.txt", "docs/a.md", "setup.py"]
    assert select_paths(SEED_PATHS, changed) == PathsDecision(
        matched=True,
        files=("deepseek/model.py", "requirements.txt"),
        reason="2 of 5 changed files match: deepseek/model.py, requirements.txt",
    )


def test_long_lists_are_shortened_in_the_reason() -> None:
    changed = [f"docs/{i}.md" for i in range(20)]
    decision = select_paths(SEED_PATHS, changed)
    assert decision.reason.endswith("(changed: docs/0.md, docs/1.md, docs/2.md and 17 more)")
    decision = select_paths(["docs/**"], changed)
    assert (
        decision.reason
        == "20 of 20 changed files match: docs/0.md, docs/1.md, docs/2.md and 17 more"
    )


def test_one_matching_file_reads_in_the_singular() -> None:
    assert select_paths(["a"], ["a"]).reason == "1 of 1 changed file matches: a"
    assert select_paths(["a"], ["a", "b"]).reason == "1 of 2 changed files matches: a"


def test_without_a_paths_filter_every_push_matches() -> None:
    assert select_paths([], ["README.md"]) == PathsDecision(
        True, ("README.md",), "no paths filter, so every change counts"
    )
    assert select_paths([], []).matched


def test_a_push_without_changed_files_does_not_match_a_paths_filter() -> None:
    decision = select_paths(SEED_PATHS, [])
    assert not decision.matched
    assert decision.reason.startswith("no files changed")


def test_matching_takes_linear_time_even_for_a_pathological_pattern() -> None:
    # A backtracking regex would take hours on this; the test would then hit pytest's timeout.
    glob = Glob.compile("*a" * 30 + "b")
    assert not glob.matches("a" * 5000)
    assert Glob.compile("**a" * 30 + "/b").matches("a" * 5000 + "/b")


# --- properties against a reference matcher ---------------------------------------------------


def _class_member(body: str, i: int) -> tuple[str, int]:
    if body[i] == "\\":
        return body[i + 1], i + 2
    return body[i], i + 1


def _reference_class(body: str, i: int) -> tuple[list[tuple[str, str]], bool, int]:
    """The ranges, negation and end of the class opening at body[i]."""
    i += 1
    negated = body[i] == "!"
    if negated:
        i += 1
    ranges = []
    while body[i] != "]":
        low, i = _class_member(body, i)
        high = low
        if body[i] == "-" and body[i + 1] != "]":
            high, i = _class_member(body, i + 1)
        ranges.append((low, high))
    return ranges, negated, i + 1


def reference_match(pattern: str, path: str) -> bool:
    """Plain recursive backtracking over the pattern text, straight from the documented rules."""
    body = pattern[1:] if pattern.startswith("!") else pattern

    def match(i: int, j: int) -> bool:
        if i == len(body):
            return j == len(path)
        if body[i] == "\\":
            return j < len(path) and path[j] == body[i + 1] and match(i + 2, j + 1)
        if body.startswith("**", i):
            if (i == 0 or body[i - 1] == "/") and body.startswith("/", i + 2):
                # No directory at all, or any run of characters that ends with a '/'.
                return match(i + 3, j) or any(
                    path[k] == "/" and match(i + 3, k + 1) for k in range(j, len(path))
                )
            return any(match(i + 2, k) for k in range(j, len(path) + 1))
        if body[i] == "*":
            k = j
            while not match(i + 1, k):
                if k == len(path) or path[k] == "/":
                    return False
                k += 1
            return True
        if body[i] == "?":
            return j < len(path) and path[j] != "/" and match(i + 1, j + 1)
        if body[i] == "[":
            ranges, negated, after = _reference_class(body, i)
            if j == len(path) or path[j] == "/":
                return False
            inside = any(low <= path[j] <= high for low, high in ranges)
            return inside != negated and match(after, j + 1)
        return j < len(path) and path[j] == body[i] and match(i + 1, j + 1)

    return match(0, 0)


def reference_select(patterns: list[str], value: str) -> bool:
    for pattern in reversed(patterns):
        if reference_match(pattern, value):
            return not pattern.startswith("!")
    return not patterns


_PIECES = ["a", "b", "/", ".", "*", "**", "?", "**/", "/**/", "/**", "[ab]", "[!a]", "[a-b]"]
_PIECES += ["[!/]", "[.-b]", "\\*", "\\a", "\\\\"]
bodies = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=7).map("".join)
patterns = st.builds(lambda negated, body: "!" * negated + body, st.booleans(), bodies)
paths = st.text(alphabet="ab/.", max_size=10)


@properties
@given(patterns, paths)
def test_the_matcher_agrees_with_the_reference(pattern: str, path: str) -> None:
    assert Glob.compile(pattern).matches(path) == reference_match(pattern, path)


@properties
@given(st.text(alphabet="ab/.*?[]!-\\", min_size=1, max_size=10), paths)
def test_any_valid_pattern_text_agrees_with_the_reference(pattern: str, path: str) -> None:
    try:
        glob = Glob.compile(pattern)
    except GlobError:
        assume(False)
        return
    assert glob.matches(path) == reference_match(pattern, path)


@properties
@given(st.text(max_size=20))
def test_compiling_any_text_raises_only_glob_errors(pattern: str) -> None:
    try:
        Glob.compile(pattern)
    except GlobError as error:
        offset = error.offset
    else:
        return
    assert offset is None or 0 <= offset < len(pattern)


@properties
@given(st.lists(patterns, max_size=4), paths)
def test_a_list_selects_as_the_reference_does(pattern_list: list[str], path: str) -> None:
    assert matches_any(pattern_list, path) == reference_select(pattern_list, path)


@properties
@given(bodies, paths)
def test_negation_flips_only_the_selection(body: str, path: str) -> None:
    positive, negative = Glob.compile(body), Glob.compile("!" + body)
    assert negative.negated
    assert positive.matches(path) == negative.matches(path)
    assert matches_any([body], path) == positive.matches(path)
    assert not matches_any(["!" + body], path)


@properties
@given(st.lists(patterns, min_size=1, max_size=3), patterns, paths)
def test_a_pattern_appended_overrides_what_it_matches(
    pattern_list: list[str], last: str, path: str
) -> None:
    glob = Glob.compile(last)
    expected = (not glob.negated) if glob.matches(path) else matches_any(pattern_list, path)
    assert matches_any([*pattern_list, last], path) == expected


@properties
@given(st.lists(patterns, min_size=1, max_size=3), st.lists(paths, max_size=6))
def test_select_paths_selects_each_file_as_matches_any_does(
    pattern_list: list[str], changed: list[str]
) -> None:
    decision = select_paths(pattern_list, changed)
    assert decision.files == tuple(f for f in changed if matches_any(pattern_list, f))
    assert decision.matched == bool(decision.files)
    assert decision.reason
