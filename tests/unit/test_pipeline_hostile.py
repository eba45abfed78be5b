"""Pipeline files come from any push: whatever the bytes, load_pipeline returns a Pipeline or
raises PipelineSpecError with a location, within bounded time and memory."""

from __future__ import annotations

import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciuic_common.pipeline import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_ISSUES,
    MAX_NODES,
    MAX_VALUES,
    Pipeline,
    PipelineSpecError,
    load_pipeline,
)

properties = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MINIMAL = "jobs:\n  build:\n    steps:\n      - run: make\n"

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def refusal(source: str | bytes) -> PipelineSpecError:
    """The error for a file that must be refused; every issue has a 1-based location."""
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline(source)
    for issue in raised.value.issues:
        assert issue.line is not None
        assert issue.line >= 1
        assert issue.column is not None
        assert issue.column >= 1
    return raised.value


def only_message(source: str | bytes) -> tuple[int | None, int | None, str]:
    issues = refusal(source).issues
    assert len(issues) == 1, issues
    return issues[0].line, issues[0].column, issues[0].message


@pytest.mark.timeout(10)
def test_a_billion_laughs_is_refused_before_it_expands() -> None:
    line, _, message = only_message(BILLION_LAUGHS)
    assert message.startswith(f"the file expands to more than {MAX_VALUES} values")
    assert line is not None
    assert line <= 9


def test_aliases_and_merge_keys_within_the_budget_work() -> None:
    p = load_pipeline(
        "x-job: &job\n  container: python:3.11\n  steps: [{run: make}]\n"
        "jobs:\n  a: *job\n  b:\n    <<: *job\n    needs: a\n"
    )
    assert p.jobs["a"] == p.jobs["b"].model_copy(update={"needs": []})


@pytest.mark.parametrize("text", ["a: &x [*x]\n", "a: &x {b: *x}\n"])
def test_an_alias_inside_its_own_anchor_is_refused(text: str) -> None:
    assert only_message(text) == (1, 4, "an alias refers to a node that contains it")


def test_a_merge_of_a_mapping_into_itself_is_refused() -> None:
    assert (
        only_message("a: &x {<<: *x}\n")[2] == "a `<<` merge refers to a mapping that contains it"
    )


@pytest.mark.timeout(10)
def test_merges_that_repeat_merges_are_refused_before_they_expand() -> None:
    levels = ["a0: &a0 {k: 1, l: 2, m: 3}"]
    levels += [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    assert "expands to more than" in only_message("\n".join(levels) + "\n")[2]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 100_000,
        "a: " + "{a: " * 10_000,
        "".join(" " * i + "k:\n" for i in range(MAX_DEPTH + 5)),
        "- " * 50_000,
    ],
    ids=["flow-lists", "flow-maps", "block-maps", "block-lists"],
)
def test_deep_nesting_is_refused(text: str) -> None:
    assert only_message(text)[2] == f"nesting deeper than {MAX_DEPTH} levels"


@pytest.mark.parametrize("source", ["a: " + "x" * MAX_FILE_BYTES, b"#" * (MAX_FILE_BYTES + 1)])
def test_a_huge_file_is_refused_unread(source: str | bytes) -> None:
    line, column, message = only_message(source)
    assert (line, column) == (1, 1)
    assert f"may be at most {MAX_FILE_BYTES} bytes" in message


@pytest.mark.timeout(20)
def test_a_file_with_too_many_values_is_refused() -> None:
    text = "".join(f"k{i}: {i}\n" for i in range(MAX_NODES))
    assert f"more than {MAX_NODES} keys, values and items" in only_message(text)[2]


def test_a_duplicate_key_is_an_error_at_the_second_key() -> None:
    issues = refusal(
        "jobs:\n  a:\n    steps: [{run: make}]\n  a:\n    steps: [{run: test}]\n"
        "training: {}\ntraining: {}\n"
    ).issues
    assert [(i.path, i.line, i.column, i.message) for i in issues] == [
        ("jobs.a", 4, 3, "duplicate key 'a' (first at line 2); YAML keeps only one"),
        ("training", 7, 1, "duplicate key 'training' (first at line 6); YAML keeps only one"),
    ]


def test_too_many_problems_are_cut_to_a_readable_list() -> None:
    text = "".join(f"k{i}: 1\n" for i in range(MAX_ISSUES + 50)) + MINIMAL
    issues = refusal(text).issues
    assert len(issues) == MAX_ISSUES + 1
    assert issues[-1].message == "50 more problems not shown"


@pytest.mark.parametrize(
    ("source", "where", "message"),
    [
        (bytes(range(256)), (2, 118), "the file is not UTF-8 text (byte 0x80)"),
        (b"jobs:\n  a: caf\xc3\xa9 \xff\n", (2, 11), "the file is not UTF-8 text (byte 0xff)"),
        ("jobs:\n  a: \x00\n", (2, 6), "the character U+0000 is not allowed in YAML"),
        ("jobs:\n\ta: 1\n", (2, 1), "a tab character: YAML indents with spaces only"),
        ("- a\n- b\n", (1, 1), "the top level must be a mapping of sections"),
        ("just text", (1, 1), "the top level must be a mapping of sections"),
        ("", (1, 1), "the file is empty"),
        ("# only a comment\n", (1, 1), "the file is empty"),
        (MINIMAL + "---\njobs: {}\n", (5, 1), "a second YAML document ('---')"),
        ("jobs: [unclosed\n", (2, 1), "expected ',' or ']'"),
        ("a: 'unclosed\n", (2, 1), "found unexpected end of stream"),
        ("training: !!python/object:os.system {}\n", (1, 11), "the tag !!python/object"),
        ("training: !custom {}\n", (1, 11), "the tag !custom is not supported here"),
        ("jobs: {a: {steps: [{run: !!int x}]}}\n", (1, 26), "cannot be read as !!int"),
        ("jobs: {a: {steps: [{run: make}], timeout: 2024-13-45}}\n", (1, 43), "!!timestamp"),
        ("? [a, b]\n: 1\n" + MINIMAL, (1, 3), "a key must be plain text, not a list or mapping"),
        ("yes: 1\n" + MINIMAL, (1, 1), "the key 'yes' reads as true/false, not text; quote it"),
        ("1: 1\n" + MINIMAL, (1, 1), "the key '1' reads as 1, not text; quote it"),
    ],
)
def test_unreadable_input_is_refused_with_a_location(
    source: str | bytes, where: tuple[int, int], message: str
) -> None:
    issues = refusal(source).issues
    assert any(message in i.message and (i.line, i.column) == where for i in issues), issues


def test_a_utf8_byte_order_mark_is_accepted() -> None:
    assert load_pipeline(b"\xef\xbb\xbf" + MINIMAL.encode()).jobs["build"]


def test_numbers_must_be_finite() -> None:
    issue = refusal(
        "training:\n  hyperparameters:\n    - {name: a, min: -.inf, max: .nan}\n"
    ).issues
    assert {i.message for i in issue} == {"must be a finite number"}


# --- properties -------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
KEYS = [
    "triggers", "jobs", "data", "training", "alerts", "validation", "deployment", "experiment",
    "rollout", "type", "git-push", "branches", "paths", "steps", "run", "cache", "key", "needs",
    "timeout", "resources", "env", "source", "strategy", "nodes", "gpus_per_node", "command",
    "hyperparameters", "name", "values", "min", "max", "trials", "search", "objective", "metric",
    "mode", "condition", "threshold", "actions", "stages", "dataset", "gates", "formats",
    "destination", "control", "variants", "traffic", "steps", "for", "params", "<<", "x-a",
]  # fmt: skip
keys = st.sampled_from(KEYS) | st.text(max_size=10)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)


def _outcome(source: str | bytes) -> str:
    try:
        load_pipeline(source)
    except PipelineSpecError as exc:
        for issue in exc.issues:
            assert issue.line is not None
            assert issue.line >= 1
            assert issue.column is not None
            assert issue.column >= 1
            assert issue.message
        return "refused"
    return "valid"


@properties
@given(documents)
def test_any_yaml_document_is_either_valid_or_refused_with_locations(document: Any) -> None:
    _outcome(yaml.safe_dump(document, allow_unicode=True))


@properties
@given(st.dictionaries(st.sampled_from(KEYS[:9]), documents, min_size=1, max_size=4))
def test_any_mix_of_sections_is_either_valid_or_refused_with_locations(
    sections: dict[str, Any],
) -> None:
    _outcome(yaml.safe_dump(sections, allow_unicode=True, default_flow_style=None))


@properties
@given(
    st.text(alphabet=string.printable + "&*!|>%@`{}[]:-?#'\"\u00e9\u2028\ufeff\x00", max_size=200)
)
def test_any_text_is_either_valid_or_refused_with_locations(text: str) -> None:
    _outcome(text)


@properties
@given(st.binary(max_size=200))
def test_any_bytes_are_either_valid_or_refused_with_locations(data: bytes) -> None:
    _outcome(data)


SEED_LINES = """\
triggers:
  - type: git-push
    branches: [main]
    paths: ["deepseek/**", "requirements.txt"]
jobs:
  setup:
    container: nvidia-cuda:11.3-base
    steps:
      - run: pip install -r requirements.txt
      - cache:
          key: ${{ hashFiles('requirements.txt') }}
          paths: [/root/.cache/pip]
training:
  strategy: horovod
  nodes: 4
  gpus_per_node: 8
  hyperparameters:
    - name: learning_rate
      values: [0.001, 0.0005, 0.0001]
alerts:
  - metric: training_loss
    threshold: 10.0
    condition: value > threshold or is_nan()
    actions: [{type: email, recipients: [team@example.com]}, {type: stop_training}]
""".splitlines(keepends=True)


@properties
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(SEED_LINES) - 1),
            st.integers(min_value=0, max_value=80),
            st.text(alphabet=" -:[]{}\"'#&*!$%x1.\n", max_size=3),
        ),
        max_size=3,
    ),
    st.sets(st.integers(min_value=0, max_value=len(SEED_LINES) - 1), max_size=3),
)
def test_a_mangled_seed_is_either_valid_or_refused_with_locations(
    edits: list[tuple[int, int, str]], dropped: set[int]
) -> None:
    lines = list(SEED_LINES)
    for line, column, text in edits:
        lines[line] = lines[line][:column] + text + lines[line][column:]
    source = "".join(line for index, line in enumerate(lines) if index not in dropped)
    if _outcome(source) == "valid":
        assert Pipeline.model_validate(load_pipeline(source).model_dump(mode="json"))
