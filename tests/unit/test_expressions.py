"""The expression language of alert conditions, validation gates and `${{ }}` templates."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_common.errors import InvalidArgument
from ciuic_common.expressions import (
    MAX_DEPTH,
    MAX_LENGTH,
    Binary,
    BoolOp,
    Call,
    Compare,
    Expr,
    ExpressionError,
    FunctionSig,
    Literal,
    Name,
    Template,
    Unary,
    check,
    evaluate,
    find_templates,
    format_value,
    parse,
    render,
    unparse,
)

properties = settings(max_examples=400, deadline=None)


def value_of(
    text: str, variables: Mapping[str, object] | None = None, **functions: Callable[..., object]
) -> object:
    return evaluate(parse(text), variables or {}, functions)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("1 + 2 * 3", Binary("+", Literal(1), Binary("*", Literal(2), Literal(3)))),
        ("(1 + 2) * 3", Binary("*", Binary("+", Literal(1), Literal(2)), Literal(3))),
        ("a - b - c", Binary("-", Binary("-", Name("a"), Name("b")), Name("c"))),
        ("-a * b", Binary("*", Unary("-", Name("a")), Name("b"))),
        ("a + b > c", Compare(">", Binary("+", Name("a"), Name("b")), Name("c"))),
        ("not a == b", Unary("not", Compare("==", Name("a"), Name("b")))),
        ("not a and b", BoolOp("and", Unary("not", Name("a")), Name("b"))),
        ("a or b and c", BoolOp("or", Name("a"), BoolOp("and", Name("b"), Name("c")))),
        ("a and b or c", BoolOp("or", BoolOp("and", Name("a"), Name("b")), Name("c"))),
        ("(a < b) == c", Compare("==", Compare("<", Name("a"), Name("b")), Name("c"))),
        ("not not a", Unary("not", Unary("not", Name("a")))),
        ("--1", Unary("-", Unary("-", Literal(1)))),
        (
            "value > threshold or is_nan()",
            BoolOp("or", Compare(">", Name("value"), Name("threshold")), Call("is_nan", ())),
        ),
        (
            "accuracy >= baseline - 0.01",
            Compare(">=", Name("accuracy"), Binary("-", Name("baseline"), Literal(0.01))),
        ),
        ("hashFiles('requirements.txt')", Call("hashFiles", (Literal("requirements.txt"),))),
        ("ns.f(a, 1)", Call("ns.f", (Name("a"), Literal(1)))),
        ("hparams.learning_rate", Name("hparams.learning_rate")),
    ],
)
def test_operators_bind_as_in_python(text: str, tree: Expr) -> None:
    assert parse(text) == tree


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("1.5", 1.5),
        (".5", 0.5),
        ("1.", 1.0),
        ("1e-3", 0.001),
        ("2.5E+2", 250.0),
        ("007", 7),
        ("'it\\'s'", "it's"),
        ('"tab\\there\\n"', "tab\there\n"),
        ("'back\\\\slash'", "back\\slash"),
        ("'\"'", '"'),
        ("true", True),
        ("false", False),
        ("null", None),
    ],
)
def test_literals_read_as_their_values(text: str, value: object) -> None:
    tree = parse(text)
    assert tree == Literal(value)  # type: ignore[arg-type]
    assert isinstance(tree, Literal)
    assert type(tree.value) is type(value)


def test_literals_of_different_types_are_different_nodes() -> None:
    assert Literal(1) != Literal(1.0)
    assert Literal(1) != Literal(True)
    assert len({Literal(0), Literal(0.0), Literal(False), Literal(0)}) == 3


def test_names_and_calls_are_collected_separately() -> None:
    tree = parse("value > threshold or is_nan() or hparams.lr > f(limit, g())")
    assert tree.names() == {"value", "threshold", "hparams.lr", "limit"}
    assert tree.calls() == {"is_nan", "f", "g"}


def test_keywords_are_case_sensitive() -> None:
    assert parse("True") == Name("True")
    assert parse("NOT") == Name("NOT")


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("", "expression is empty", None),
        ("   ", "expression is empty", None),
        ("a <", "unexpected end of expression", 3),
        ("(a + b))", "unexpected ')'", 7),
        ("(a + b", "'(' is never closed", 0),
        ("f(a b)", "expected ',' or ')' but found name 'b'", 4),
        ("f(a,)", "unexpected ')'", 4),
        ("a < b < c", "comparisons cannot be chained", 6),
        ("a = b", "unexpected character '='; use '=='", 2),
        ("a && b", "use 'and'", 2),
        ("!a", "use 'not'", 0),
        ("a == not b", "'not' must be in parentheses", 5),
        ("x + 1e", "malformed number '1e'", 4),
        ("1.2.3", "malformed number '1.2.3'", 0),
        ("a.", "'.' must be followed by a name", 1),
        ("a.1", "'.' must be followed by a name", 1),
        ("hparams.not", "'not' is a keyword", 8),
        ("'abc", "unterminated string", 0),
        ("x == 'a\\qb'", "unknown escape '\\q'", 7),
        ("a[0]", "unexpected character '['", 1),
        ("a\u00a0b", "unexpected character '\\xa0'", 1),
        ("\u0663", "unexpected character", 0),  # an Arabic-Indic digit is not a number here
        ("1e999", "too large", 0),
        ("a b", "unexpected name 'b'", 2),
    ],
)
def test_syntax_errors_say_what_and_where(text: str, message: str, offset: int | None) -> None:
    with pytest.raises(ExpressionError) as error:
        parse(text)
    assert message in error.value.message
    assert error.value.offset == offset


def test_an_error_reads_with_a_one_based_column() -> None:
    error = ExpressionError("unexpected ')'", 6)
    assert str(error) == "unexpected ')' at column 7"
    assert str(ExpressionError("expression is empty")) == "expression is empty"
    assert isinstance(error, InvalidArgument)


def test_nesting_is_limited_without_running_out_of_stack() -> None:
    assert parse("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == Literal(1)
    assert parse("-" * MAX_DEPTH + "1") is not None
    assert parse(" + ".join(["1"] * (MAX_DEPTH + 1))) is not None
    for text in (
        "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),
        "-" * (MAX_DEPTH + 1) + "1",
        " + ".join(["1"] * (MAX_DEPTH + 2)),
        "f(" * 2000,
        "not " * 1000 + "a",
    ):
        with pytest.raises(ExpressionError, match="nests more than 64 levels"):
            parse(text)


def test_long_expressions_are_refused() -> None:
    assert parse("1" * MAX_LENGTH) == Literal(int("1" * MAX_LENGTH))
    with pytest.raises(ExpressionError, match="longer than 4096"):
        parse("1" * (MAX_LENGTH + 1))


# --- writing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "text"),
    [
        (Binary("*", Binary("+", Name("a"), Name("b")), Name("c")), "(a + b) * c"),
        (Binary("-", Name("a"), Binary("-", Name("b"), Name("c"))), "a - (b - c)"),
        (Binary("-", Binary("-", Name("a"), Name("b")), Name("c")), "a - b - c"),
        (Unary("-", Binary("+", Name("a"), Name("b"))), "-(a + b)"),
        (Unary("-", Unary("not", Name("a"))), "-(not a)"),
        (Compare("==", Name("a"), Unary("not", Name("b"))), "a == (not b)"),
        (Compare("<", Compare("<", Name("a"), Name("b")), Name("c")), "(a < b) < c"),
        (Binary("-", Name("a"), Literal(-1)), "a - -1"),
        (Binary("*", Literal(-1.5), Name("a")), "-1.5 * a"),
        (Unary("-", Literal(-1)), "--1"),
        (
            Call("f", (Literal("it's\n"), Literal(None), Literal(1e-05))),
            "f('it\\'s\\n', null, 1e-05)",
        ),
    ],
)
def test_unparse_writes_only_the_parentheses_needed(tree: Expr, text: str) -> None:
    assert unparse(tree) == text


def test_non_finite_floats_have_no_literal() -> None:
    with pytest.raises(ExpressionError, match="cannot be written"):
        unparse(Literal(math.inf))


# --- evaluation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),
        ("8 / 4 / 2", 1.0),
        ("7 % 4 * 2", 6),
        ("-7 % 3", 2),
        ("-2 * 3", -6),
        ("+2", 2),
        ("'ab' + 'cd'", "abcd"),
        ("not true and false", False),
        ("not (true and false)", True),
        ("true or false and false", True),
        ("1 + 2 == 3", True),
        ("1 == 1.0", True),
        ("1 == true", False),
        ("'1' == 1", False),
        ("null == null", True),
        ("null != 0", True),
        ("'abc' < 'abd'", True),
        ("2 >= 2.0", True),
    ],
)
def test_evaluation(text: str, value: object) -> None:
    result = value_of(text)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize(
    ("value", "fires"),
    [(12.5, True), (10.0, False), (3.0, False), (math.nan, True), (math.inf, True)],
)
def test_the_seed_alert_condition(value: float, fires: bool) -> None:
    condition = parse("value > threshold or is_nan()")
    variables = {"value": value, "threshold": 10.0}
    assert evaluate(condition, variables, {"is_nan": lambda: math.isnan(value)}) is fires


def test_or_does_not_evaluate_its_right_side_once_true() -> None:
    def is_nan() -> bool:
        raise AssertionError("must not be called")

    condition = parse("value > threshold or is_nan()")
    assert evaluate(condition, {"value": 11, "threshold": 10}, {"is_nan": is_nan}) is True
    assert value_of("false and 1 / 0") is False
    assert value_of("true or 'not a boolean'") is True


@pytest.mark.parametrize(
    ("accuracy", "passes"), [(0.95, True), (0.94, True), (0.9395, False), (math.nan, False)]
)
def test_a_validation_gate_against_the_baseline(accuracy: float, passes: bool) -> None:
    gate = parse("accuracy >= baseline - 0.01")
    assert evaluate(gate, {"accuracy": accuracy, "baseline": 0.95}) is passes


def test_nan_compares_as_in_ieee() -> None:
    nan = {"n": math.nan}
    for op in ("==", "<", "<=", ">", ">="):
        assert value_of(f"n {op} n", nan) is False
        assert value_of(f"n {op} 1", nan) is False
    assert value_of("n != n", nan) is True
    assert math.isnan(value_of("n + 1", nan))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 / 0", "division by zero"),
        ("1.0 / 0.0", "division by zero"),
        ("1 % 0", "modulo by zero"),
        ("'a' < 1", "cannot compare a string and a number with '<'"),
        ("null < 1", "cannot compare null and a number"),
        ("true + 1", "'+' needs two numbers, got a boolean and a number"),
        ("'a' * 3", "'*' needs two numbers, got a string and a number"),
        ("-'a'", "unary '-' needs a number, got a string"),
        ("1 and true", "'and' needs true or false, got a number"),
        ("false or null", "'or' needs true or false, got null"),
        ("not 0", "'not' needs true or false, got a number"),
        ("missing > 1", "unknown variable 'missing'"),
        ("treshold > 1", "unknown variable 'treshold' (did you mean 'threshold'?)"),
        ("True", "unknown variable 'True' (did you mean 'true'?)"),
        ("hparams.lr", "unknown variable 'hparams.lr': 'hparams' has no 'lr'"),
        ("threshold.x", "'threshold' has no 'x'"),
        ("nope()", "unknown function 'nope'"),
        ("is_nan(1)", "is_nan() takes no arguments, got 1"),
        ("1" + "0" * 400 + " / 3", "too large for a number"),
    ],
)
def test_evaluation_errors_name_the_problem(text: str, message: str) -> None:
    variables = {"threshold": 10.0, "hparams": {"batch_size": 32}}
    with pytest.raises(ExpressionError) as error:
        evaluate(parse(text), variables, {"is_nan": lambda: False})
    assert message in str(error.value)


def test_dotted_names_read_flat_keys_first_then_nested_mappings() -> None:
    assert value_of("hparams.lr", {"hparams.lr": 0.1, "hparams": {"lr": 0.2}}) == 0.1
    assert value_of("a.b.c", {"a": {"b": {"c": 3}}}) == 3


def test_a_function_gets_its_arguments_and_its_arity_is_checked() -> None:
    def hash_files(*paths: str) -> str:
        return "h-" + "-".join(paths)

    assert value_of("hashFiles('a', 'b')", hashFiles=hash_files) == "h-a-b"
    assert value_of("ns.twice(x)", {"x": 2}, **{"ns.twice": lambda v: v * 2}) == 4
    with pytest.raises(ExpressionError, match=r"pick\(\) takes 1 to 2 arguments, got 3"):
        value_of("pick(1, 2, 3)", pick=lambda a, b=0: a)


@pytest.mark.parametrize(
    ("function", "sig"),
    [
        (lambda: None, FunctionSig(0, 0)),
        (lambda a, b=1: None, FunctionSig(1, 2)),
        (lambda *a: None, FunctionSig(0, None)),
        (lambda a, *rest, flag=False: None, FunctionSig(1, None)),
    ],
)
def test_the_arity_of_a_python_function(function: Callable[..., object], sig: FunctionSig) -> None:
    assert FunctionSig.of(function) == sig


@pytest.mark.parametrize(
    ("sig", "words"),
    [
        (FunctionSig(0, 0), "takes no arguments"),
        (FunctionSig(1, 1), "takes 1 argument"),
        (FunctionSig(2, 2), "takes 2 arguments"),
        (FunctionSig(1, 3), "takes 1 to 3 arguments"),
        (FunctionSig(1, None), "takes at least 1 argument"),
        (FunctionSig(), "takes any number of arguments"),
    ],
)
def test_a_function_signature_in_words(sig: FunctionSig, words: str) -> None:
    assert sig.describe() == words


# --- static checks ----------------------------------------------------------------------------


def test_check_reports_unknown_names_functions_and_arities_in_order() -> None:
    tree = parse("value > treshold or is_nan(1) or foo() or hparams.lr > limit or foo()")
    messages = check(
        tree,
        variables={"value", "threshold", "hparams"},
        functions={"is_nan": FunctionSig(0, 0)},
    )
    assert messages == [
        "unknown variable 'treshold' (did you mean 'threshold'?)",
        "is_nan() takes no arguments, got 1",
        "unknown function 'foo' (known functions: is_nan)",
        "unknown variable 'limit' (known variables: hparams, threshold, value)",
    ]


def test_check_passes_a_clean_expression_and_accepts_plain_function_names() -> None:
    tree = parse("value > threshold or is_nan() or hparams.batch_size > 1")
    variables = {"value", "threshold", "hparams.batch_size"}
    assert check(tree, variables=variables, functions=["is_nan"]) == []
    assert check(tree, variables=variables, functions={"is_nan": FunctionSig(0, 0)}) == []
    assert check(parse("x"), variables=[], functions=[]) == [
        "unknown variable 'x' (no variables are defined here)"
    ]


# --- templates --------------------------------------------------------------------------------


def test_the_seed_command_template_renders_the_hyperparameter() -> None:
    command = "python train.py --lr ${{ hparams.learning_rate }} --bs ${{hparams.batch_size}}"
    variables = {"hparams": {"learning_rate": 0.001, "batch_size": 32}}
    assert render(command, variables) == "python train.py --lr 0.001 --bs 32"


def test_the_seed_cache_key_calls_hash_files() -> None:
    key = "${{ hashFiles('requirements.txt') }}"
    [template] = find_templates(key)
    assert template == Template(0, len(key), Call("hashFiles", (Literal("requirements.txt"),)))
    assert render(key, {}, {"hashFiles": lambda *paths: "ab12"}) == "ab12"


def test_templates_are_found_with_their_positions() -> None:
    text = "a ${{ x }} b ${{ f('}}') }}}"
    first, second = find_templates(text)
    assert text[first.start : first.end] == "${{ x }}"
    assert text[second.start : second.end] == "${{ f('}}') }}"
    assert second.expr == Call("f", (Literal("}}"),))
    assert render(text, {"x": 1}, {"f": lambda s: s}) == "a 1 b }}}"
    assert find_templates("no templates, ${ x } {{ y }}") == []


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.001, "0.001"),
        (1e-05, "1e-05"),
        (32, "32"),
        (2.0, "2.0"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ("s3://x", "s3://x"),
    ],
)
def test_values_render_as_in_the_language(value: object, text: str) -> None:
    assert format_value(value) == text
    assert render("${{ v }}", {"v": value}) == text


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("echo ${{ a + }} x", "unexpected end of expression", 13),
        ("echo ${{ a ", "'${{' is never closed", 5),
        ("ok ${{ a }} then ${{ ) }}", "unexpected ')'", 21),
        ("echo ${{ }}", "expression is empty", 5),
        ("echo ${{ 'a }}", "unterminated string", 9),
    ],
)
def test_template_errors_point_into_the_whole_text(text: str, message: str, offset: int) -> None:
    with pytest.raises(ExpressionError) as error:
        find_templates(text)
    assert message in error.value.message
    assert error.value.offset == offset


def test_a_failing_template_names_itself() -> None:
    with pytest.raises(ExpressionError) as error:
        render("python train.py --lr ${{ hparams.lr }}", {"hparams": {}})
    assert error.value.message == (
        "unknown variable 'hparams.lr': 'hparams' has no 'lr' in ${{ hparams.lr }}"
    )
    assert error.value.offset == 21


# --- it never runs code -----------------------------------------------------------------------

_DANGEROUS_EVENTS = frozenset(
    {"exec", "compile", "import", "open", "os.system", "subprocess.Popen", "os.exec"}
    | {"os.posix_spawn", "os.spawn", "os.fork", "ctypes.dlopen", "builtins.input"}
)
_audited: list[str] = []
_armed = False
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _armed and event in _DANGEROUS_EVENTS:
        _audited.append(event)


@contextmanager
def _watching_for_code_execution() -> Iterator[list[str]]:
    global _armed, _hooked
    if not _hooked:
        # An audit hook cannot be removed: it stays for the session, recording only while armed.
        sys.addaudithook(_audit)
        _hooked = True
    _audited.clear()
    _armed = True
    try:
        yield _audited
    finally:
        _armed = False


class _Tempting:
    """A variable whose attributes would run code if the language ever reached them."""

    ran: list[str] = []

    def system(self, *args: object) -> None:
        self.ran.append("system")

    def __getattr__(self, name: str) -> object:
        self.ran.append(name)
        return self.system


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/ciuic-pwned')",
        "__import__('os')",
        "eval('1 + 1')",
        "exec('x = 1')",
        "compile('1', 'f', 'eval')",
        "open('/etc/passwd')",
        "getattr(x, 'system')()",
        "().__class__.__bases__[0].__subclasses__()",
        "''.__class__.__mro__",
        "x.__class__",
        "x.__dict__",
        "x.system('id')",
        "x.system",
        "print.__self__",
        "__builtins__",
        "globals()",
        "lambda: 1",
        "(lambda: 1)()",
        "[c for c in 'ab']",
        "{'a': 1}",
        "f'{x}'",
        "x if true else 1",
        "x := 1",
        "a; b",
        "import os",
        "`ls`",
        "$(ls)",
        "1 ** 10 ** 10",
    ],
)
def test_nothing_is_ever_executed(text: str) -> None:
    variables = {"x": _Tempting(), "print": print}
    with _watching_for_code_execution() as events, pytest.raises(ExpressionError):
        evaluate(parse(text), variables)
    assert events == []
    assert _Tempting.ran == []


def test_the_audit_hook_would_notice_code_execution() -> None:
    with _watching_for_code_execution() as events:
        exec("1")  # the canary: proves the hook above is listening
    assert "exec" in events


# --- properties -------------------------------------------------------------------------------

_TOKENS = [
    *"()+-*/%,.<>=!'\"\\ ",
    *("==", "!=", "<=", ">=", "and", "or", "not", "true", "false", "null"),
    *("a", "b.c", "f", "g.h", "1", "1.5e3", ".5", "1e", "'s'", '"t\\n"', "'x", "${{", "}}"),
]


@properties
@given(st.text())
def test_parse_raises_only_expression_errors_on_any_text(text: str) -> None:
    with suppress(ExpressionError):
        parse(text)


@properties
@given(st.lists(st.sampled_from(_TOKENS), max_size=30).map("".join))
def test_token_soup_either_fails_cleanly_or_round_trips(text: str) -> None:
    try:
        tree = parse(text)
    except ExpressionError:
        return
    assert parse(unparse(tree)) == tree


@properties
@given(st.text(alphabet=st.sampled_from([*"${}' ax+"]), max_size=40))
def test_find_templates_raises_only_expression_errors(text: str) -> None:
    try:
        templates = find_templates(text)
    except ExpressionError as error:
        offset = error.offset
        templates = []
    else:
        offset = 0
    assert offset is not None
    assert 0 <= offset <= len(text)
    for template in templates:
        assert text[template.start : template.start + 3] == "${{"
        assert text[template.end - 2 : template.end] == "}}"


@properties
@given(st.text().filter(lambda text: "${{" not in text))
def test_text_without_templates_renders_unchanged(text: str) -> None:
    assert render(text, {}) == text


# Generated trees, with a reference evaluator written directly against the documented
# semantics, independently of the module under test.

_VARIABLES: dict[str, object] = {
    "x": 3,
    "y": -2.5,
    "flag": True,
    "s": "ab",
    "nothing": None,
    "hparams": {"lr": 0.001},
}
_FLAT: dict[str, object] = {"x": 3, "y": -2.5, "flag": True, "s": "ab", "nothing": None}
_FLAT["hparams.lr"] = 0.001
_ABSENT = object()
_FUNCTIONS: dict[str, Callable[..., object]] = {
    "count": lambda *args: len(args),
    "ident": lambda value: value,
    "ns.pair": lambda first, second=_ABSENT: second is _ABSENT,
}


class _Fails(Exception):
    """The reference's verdict that evaluation must fail."""


def _is_num(value: object) -> bool:
    return type(value) in (int, float)


def _reference(tree: Expr) -> object:
    match tree:
        case Literal(value=value):
            return value
        case Name(name=name):
            if name not in _FLAT:
                raise _Fails
            return _FLAT[name]
        case Call(function=function, args=args):
            values = [_reference(arg) for arg in args]
            if function == "count":
                return len(values)
            if function == "ident" and len(values) == 1:
                return values[0]
            if function == "ns.pair" and 1 <= len(values) <= 2:
                return len(values) == 1
            raise _Fails
        case Unary(op=op, operand=operand):
            inner = _reference(operand)
            if op == "not":
                if type(inner) is not bool:
                    raise _Fails
                return not inner
            if not _is_num(inner):
                raise _Fails
            return -inner if op == "-" else inner  # type: ignore[operator]
        case BoolOp(op=op, left=left, right=right):
            first = _reference(left)
            if type(first) is not bool:
                raise _Fails
            if (op == "and" and not first) or (op == "or" and first):
                return first
            second = _reference(right)
            if type(second) is not bool:
                raise _Fails
            return second
        case Compare(op=op, left=left, right=right):
            a, b = _reference(left), _reference(right)
            if op in ("==", "!="):
                same = a == b if _is_num(a) and _is_num(b) else type(a) is type(b) and a == b
                return same if op == "==" else not same
            if not ((_is_num(a) and _is_num(b)) or (type(a) is str and type(b) is str)):
                raise _Fails
            ordered: dict[str, Callable[[object, object], bool]] = {
                "<": lambda p, q: p < q,  # type: ignore[operator]
                "<=": lambda p, q: p <= q,  # type: ignore[operator]
                ">": lambda p, q: p > q,  # type: ignore[operator]
                ">=": lambda p, q: p >= q,  # type: ignore[operator]
            }
            return ordered[op](a, b)
        case Binary(op=op, left=left, right=right):
            a, b = _reference(left), _reference(right)
            if op == "+" and type(a) is str and type(b) is str:
                return a + b
            if not (_is_num(a) and _is_num(b)) or (op in "/%" and b == 0):
                raise _Fails
            try:
                arithmetic: dict[str, Callable[[object, object], object]] = {
                    "+": lambda p, q: p + q,  # type: ignore[operator]
                    "-": lambda p, q: p - q,  # type: ignore[operator]
                    "*": lambda p, q: p * q,  # type: ignore[operator]
                    "/": lambda p, q: p / q,  # type: ignore[operator]
                    "%": lambda p, q: p % q,  # type: ignore[operator]
                }
                return arithmetic[op](a, b)
            except OverflowError:
                raise _Fails from None
    raise AssertionError(tree)


def _same_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


_names = st.sampled_from(["x", "y", "flag", "s", "nothing", "hparams.lr", "missing", "hparams.no"])
_literals = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=0, max_value=10**30),
    # The parser never makes negative number literals: `-1` is unary minus applied to 1.
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).filter(
        lambda f: math.copysign(1.0, f) > 0
    ),
    st.text(max_size=6),
)
_leaves = st.one_of(_literals.map(Literal), _names.map(Name))


def _branches(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    return st.one_of(
        st.builds(Unary, st.sampled_from(["-", "+", "not"]), children),
        st.builds(Binary, st.sampled_from(["+", "-", "*", "/", "%"]), children, children),
        st.builds(Compare, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), children, children),
        st.builds(BoolOp, st.sampled_from(["and", "or"]), children, children),
        st.builds(
            Call,
            st.sampled_from(["count", "ident", "ns.pair", "nope"]),
            st.lists(children, max_size=3).map(tuple),
        ),
    )


trees = st.recursive(_leaves, _branches, max_leaves=12)

# Well-typed trees evaluate to values more often than to errors, so they test arithmetic and
# comparisons rather than mostly type checks.
_numbers = st.recursive(
    st.one_of(
        st.integers(min_value=0, max_value=1000).map(Literal),
        st.sampled_from([0.0, 0.5, 1e-3, 2.0, 1e300]).map(Literal),
        st.sampled_from(["x", "y", "hparams.lr"]).map(Name),
    ),
    lambda children: st.one_of(
        st.builds(Unary, st.sampled_from(["-", "+"]), children),
        st.builds(Binary, st.sampled_from(["+", "-", "*", "/", "%"]), children, children),
    ),
    max_leaves=8,
)
_booleans = st.recursive(
    st.one_of(
        st.booleans().map(Literal),
        st.just(Name("flag")),
        st.builds(Compare, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _numbers, _numbers),
    ),
    lambda children: st.one_of(
        st.builds(Unary, st.just("not"), children),
        st.builds(BoolOp, st.sampled_from(["and", "or"]), children, children),
    ),
    max_leaves=6,
)


@properties
@given(trees)
def test_unparse_then_parse_gives_the_same_tree(tree: Expr) -> None:
    assert parse(unparse(tree)) == tree


@properties
@given(st.one_of(trees, _numbers, _booleans))
def test_evaluation_agrees_with_the_reference(tree: Expr) -> None:
    try:
        expected = _reference(tree)
    except _Fails:
        with pytest.raises(ExpressionError):
            evaluate(parse(unparse(tree)), _VARIABLES, _FUNCTIONS)
        return
    actual = evaluate(parse(unparse(tree)), _VARIABLES, _FUNCTIONS)
    assert _same_value(actual, expected), (unparse(tree), actual, expected)


@properties
@given(trees)
def test_check_is_silent_exactly_when_every_name_and_function_is_known(tree: Expr) -> None:
    variables = {"x", "y", "flag", "s", "nothing", "hparams"}
    functions = {"count", "ident", "ns.pair"}
    messages = check(tree, variables=variables, functions=functions)
    unknown = {n for n in tree.names() if n.split(".")[0] not in variables}
    assert (messages == []) == (not unknown and tree.calls() <= functions)
    assert len(messages) == len(unknown) + len(tree.calls() - functions)
