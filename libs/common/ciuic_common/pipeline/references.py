"""What a condition, a gate or a `${{ }}` template may name, and how a wrong name is explained.

Each check returns problems as `(offset, message)` pairs, the offset being a 0-based character
position in the checked string (or None), so the loader can point at the exact column.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping

from ciuic_common.expressions import (
    Call,
    Expr,
    ExpressionError,
    FunctionSig,
    Literal,
    check,
    find_templates,
    parse,
    unparse,
)

__all__ = [
    "ALERT_FUNCTIONS",
    "GATE_FUNCTIONS",
    "TEMPLATE_FUNCTIONS",
    "Problem",
    "check_condition",
    "check_gate",
    "check_templates",
    "closest",
    "undeclared_hyperparameters",
]

Problem = tuple[int | None, str]

#: In an alert condition, `is_nan()` and `is_inf()` with no argument test the rule's `value`.
ALERT_FUNCTIONS: Mapping[str, FunctionSig] = {
    "is_nan": FunctionSig(0, 1),
    "is_inf": FunctionSig(0, 1),
    "abs": FunctionSig(1, 1),
    "min": FunctionSig(1, None),
    "max": FunctionSig(1, None),
}
#: A gate has no single `value`, so is_nan/is_inf name what they test.
GATE_FUNCTIONS: Mapping[str, FunctionSig] = {
    "is_nan": FunctionSig(1, 1),
    "is_inf": FunctionSig(1, 1),
    "abs": FunctionSig(1, 1),
    "min": FunctionSig(1, None),
    "max": FunctionSig(1, None),
}
#: `${{ hashFiles('requirements.txt', ...) }}`: a digest of repository files, for cache keys.
TEMPLATE_FUNCTIONS: Mapping[str, FunctionSig] = {"hashFiles": FunctionSig(1, None)}

_HPARAMS = "hparams."
_BASELINE = "baseline"


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a typo most likely meant, or None when none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    match = closest(name, candidates)
    return f" (did you mean {match!r}?)" if match else ""


def _offset_of(name: str, text: str, start: int = 0) -> int | None:
    """Where `name` first appears in `text` as a whole (dotted) name; None if it does not."""
    found = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text)
    return None if found is None else start + found.start()


def _parse(text: str) -> tuple[Expr | None, list[Problem]]:
    try:
        return parse(text), []
    except ExpressionError as exc:
        return None, [(exc.offset, exc.message)]


def _call_problems(expr: Expr, text: str, functions: Mapping[str, FunctionSig]) -> list[Problem]:
    """Unknown functions and wrong argument counts (variables are checked by the caller)."""
    messages = check(expr, variables=expr.names(), functions=functions)
    return [(_first_mentioned(message, text), message) for message in messages]


def _first_mentioned(message: str, text: str) -> int | None:
    """The offset of the first name in `message` ('name' or name()) that appears in `text`."""
    for quoted, called in re.findall(r"'([A-Za-z_][\w.]*)'|^([A-Za-z_]\w*)\(\)", message):
        offset = _offset_of(quoted or called, text)
        if offset is not None:
            return offset
    return None


def check_condition(text: str, parameters: Collection[str] | None) -> list[Problem]:
    """Problems in an alert condition that may use `value` and the rule's `parameters`.

    With `parameters` None (they are invalid) only the syntax and the calls are checked.
    """
    expr, problems = _parse(text)
    if expr is None:
        return problems
    if parameters is None:
        return _call_problems(expr, text, ALERT_FUNCTIONS)
    known = {"value", *parameters}
    for name in sorted(expr.names() - known):
        if name in ALERT_FUNCTIONS:
            message = f"{name} is a function: write {name}()"
        elif parameters:
            listed = ", ".join(sorted(parameters))
            message = (
                f"condition uses {name!r}, which is not a parameter of this rule"
                f"{_did_you_mean(name, known)}; its parameters are: {listed}"
            )
        else:
            message = (
                f"condition uses {name!r}, which is not a parameter of this rule"
                f"{_did_you_mean(name, known)}; add it next to the condition, "
                f"e.g. {name}: 10.0"
            )
        problems.append((_offset_of(name, text), message))
    return problems + _call_problems(expr, text, ALERT_FUNCTIONS)


def check_gate(text: str) -> list[Problem]:
    """Problems in a gate such as `accuracy >= baseline - 0.01` or `loss < baseline.loss`.

    Plain names are metrics of the evaluated model; `baseline.<metric>` is that metric's value
    in history; a bare `baseline` is the baseline of the one metric the gate names.
    """
    expr, problems = _parse(text)
    if expr is None:
        return problems
    names = expr.names()
    metrics = sorted(n for n in names if "." not in n and n != _BASELINE)
    for name in sorted(n for n in names if "." in n):
        head, _, rest = name.partition(".")
        if head != _BASELINE or "." in rest:
            problems.append(
                (
                    _offset_of(name, text),
                    f"{name!r} is not a metric name: a gate names metrics as plain "
                    "identifiers, and baseline.<metric> for a metric's value in history",
                )
            )
    if _BASELINE in names and len(metrics) != 1:
        which = f"names {len(metrics)} metrics" if metrics else "names no metric"
        problems.append(
            (
                _offset_of(_BASELINE, text),
                f"a bare 'baseline' is the baseline of the gate's one metric, but this gate "
                f"{which}; write baseline.<metric>",
            )
        )
    return problems + _call_problems(expr, text, GATE_FUNCTIONS)


def undeclared_hyperparameters(text: str, hyperparameters: Collection[str]) -> list[Problem]:
    """`${{ hparams.x }}` in `text` naming a hyperparameter that is not declared."""
    try:
        templates = find_templates(text)
    except ExpressionError:
        return []  # reported where the text is checked on its own
    problems: list[Problem] = []
    for template in templates:
        body = text[template.start : template.end]
        for name in sorted(template.expr.names()):
            if name.startswith(_HPARAMS) and name.count(".") == 1:
                problem = _template_name_problem(name, hyperparameters)
                if problem:
                    problems.append((template.start + (_offset_of(name, body) or 0), problem))
    return problems


def check_templates(text: str, hyperparameters: Collection[str] | None) -> list[Problem]:
    """Problems in the `${{ }}` templates of a command or cache key.

    Templates may name `hparams.<name>` and call `hashFiles('path', ...)` with string literals.
    With `hyperparameters` None the declared names are not known yet, so only the namespace is
    checked; the pipeline checks the names once it knows them.
    """
    try:
        templates = find_templates(text)
    except ExpressionError as exc:
        return [(exc.offset, exc.message)]
    problems: list[Problem] = []
    for template in templates:
        body = text[template.start : template.end]
        # A name inside hashFiles(...) is reported as a non-literal argument, not twice.
        hashed = {
            name
            for node in template.expr.walk()
            if isinstance(node, Call) and node.function == "hashFiles"
            for arg in node.args
            for name in arg.names()
        }
        for name in sorted(template.expr.names() - hashed):
            offset = _offset_of(name, body)
            at = template.start + (offset or 0)
            problem = _template_name_problem(name, hyperparameters)
            if problem:
                problems.append((at, problem))
        for offset, message in _call_problems(template.expr, body, TEMPLATE_FUNCTIONS):
            problems.append((template.start + (offset or 0), message))
        problems += [
            (template.start + (offset or 0), message)
            for offset, message in _hash_files_problems(template.expr, body)
        ]
    return problems


def _template_name_problem(name: str, hyperparameters: Collection[str] | None) -> str | None:
    if not name.startswith(_HPARAMS) or name.count(".") != 1:
        return (
            f"{name!r} is not available in ${{{{ }}}}: templates may use hparams.<name> "
            "and hashFiles('file', ...)"
        )
    if hyperparameters is None:
        return None
    short = name.removeprefix(_HPARAMS)
    if short in hyperparameters:
        return None
    if not hyperparameters:
        return f"{name} is not declared: training.hyperparameters is empty"
    declared = ", ".join(sorted(hyperparameters))
    return (
        f"{name} is not a declared hyperparameter{_did_you_mean(short, hyperparameters)}; "
        f"declared: {declared}"
    )


def _hash_files_problems(expr: Expr, body: str) -> list[Problem]:
    """hashFiles runs on the agent before any variable exists, so it takes string literals."""
    problems: list[Problem] = []
    for node in expr.walk():
        if not (isinstance(node, Call) and node.function == "hashFiles"):
            continue
        for arg in node.args:
            if not (isinstance(arg, Literal) and isinstance(arg.value, str)):
                problems.append(
                    (
                        _offset_of("hashFiles", body),
                        "hashFiles() takes file names as string literals, e.g. "
                        f"hashFiles('requirements.txt'), not {unparse(arg)}",
                    )
                )
    return problems
