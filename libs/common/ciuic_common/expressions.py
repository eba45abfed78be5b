"""A small, safe expression language: alert conditions, validation gates and `${{ }}` templates.

Text is tokenized and parsed by hand into frozen dataclasses; nothing here calls Python's
eval/exec/compile, and evaluation only looks names up in the mappings the caller passes, so an
expression can read values and call the functions it is given, and nothing else.

The language, and the decisions behind it:
- Literals: ints, floats (`1.5`, `.5`, `1e-3`), strings in '...' or "..." with the escapes
  `\\\\ \\' \\" \\n \\t \\r`, and `true`, `false`, `null`. Keywords are case-sensitive.
- Names: ASCII identifiers, dotted ones (`hparams.learning_rate`) being one name. A dotted name
  is looked up whole first, then segment by segment through nested mappings (never attributes).
- Calls `f(a, b)` of plain or dotted function names; nothing else is callable.
- Operators, loosest first as in Python: `or`, `and`, `not`, comparisons, `+ -`, `* / %`,
  unary `- +`. Comparisons do not chain: `a < b < c` is an error, write `a < b and b < c`.
- Numbers are ints and floats; booleans are not numbers (`true + 1` is an error). `/` always
  gives a float; dividing by zero (or `%` by zero) is an error rather than inf. Floats otherwise
  follow IEEE: every comparison with NaN is false except `!=`.
- `+` also joins two strings. `< <= > >=` compare two numbers or two strings; `==`/`!=` accept
  any values, and values of different kinds are never equal (`1 == true` is false).
- `and`, `or` and `not` take booleans only (`threshold or 10` is an error, not a default) and
  short-circuit: the right side is only evaluated, and type-checked, when needed.
- Size limits: at most 4096 characters and 64 levels of nesting (each parenthesis, operator and
  call counts one), so parsing never runs out of stack.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ciuic_common.errors import InvalidArgument

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Binary",
    "BoolOp",
    "Call",
    "Compare",
    "Expr",
    "ExpressionError",
    "FunctionSig",
    "Literal",
    "Name",
    "Template",
    "Unary",
    "check",
    "evaluate",
    "find_templates",
    "format_value",
    "parse",
    "render",
    "unparse",
]

MAX_LENGTH = 4096
MAX_DEPTH = 64

LiteralValue: typing.TypeAlias = bool | int | float | str | None
UnaryOp: typing.TypeAlias = typing.Literal["-", "+", "not"]
BinaryOp: typing.TypeAlias = typing.Literal["+", "-", "*", "/", "%"]
CompareOp: typing.TypeAlias = typing.Literal["==", "!=", "<", "<=", ">", ">="]
BoolOpName: typing.TypeAlias = typing.Literal["and", "or"]
Functions: typing.TypeAlias = Mapping[str, Callable[..., object]]

_NO_FUNCTIONS: Functions = MappingProxyType({})


class ExpressionError(InvalidArgument):
    """An expression that cannot be parsed or evaluated; `offset` is 0-based into its text."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message, offset)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} at column {self.offset + 1}"


# --- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A node of a parsed expression; immutable, compared by structure."""

    def children(self) -> tuple[Expr, ...]:
        """The direct sub-expressions, left to right."""
        return ()

    def walk(self) -> Iterator[Expr]:
        """Every node of the tree, parents before children, left to right."""
        stack: list[Expr] = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children()))

    def names(self) -> frozenset[str]:
        """The variable names the expression reads (function names are not included)."""
        return frozenset(node.name for node in self.walk() if isinstance(node, Name))

    def calls(self) -> frozenset[str]:
        """The names of the functions the expression calls."""
        return frozenset(node.function for node in self.walk() if isinstance(node, Call))


@dataclass(frozen=True, eq=False)
class Literal(Expr):
    value: LiteralValue

    def __eq__(self, other: object) -> bool:
        # Python says 1 == 1.0 == True, but they are three different literals.
        return (
            isinstance(other, Literal)
            and type(other.value) is type(self.value)
            and other.value == self.value
        )

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))


@dataclass(frozen=True)
class Name(Expr):
    name: str


@dataclass(frozen=True)
class Call(Expr):
    function: str
    args: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.args


@dataclass(frozen=True)
class Unary(Expr):
    op: UnaryOp
    operand: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Binary(Expr):
    op: BinaryOp
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class Compare(Expr):
    op: CompareOp
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class BoolOp(Expr):
    op: BoolOpName
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


# --- tokens ---------------------------------------------------------------------------------

_KEYWORDS = frozenset({"true", "false", "null", "and", "or", "not"})
_CONSTANTS: dict[str, LiteralValue] = {"true": True, "false": False, "null": None}
_OPERATORS = frozenset({"==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ","})
_HINTS = {
    "=": "use '==' to compare",
    "!": "use 'not' to negate, '!=' to compare",
    "&": "use 'and'",
    "&&": "use 'and'",
    "|": "use 'or'",
    "||": "use 'or'",
}
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
_WHITESPACE = frozenset(" \t\r\n")
_DIGITS = frozenset("0123456789")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | _DIGITS
# ASCII only on purpose: `str.isdigit` and `\d` accept digits from every script.
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

_TokenKind: typing.TypeAlias = typing.Literal["number", "string", "name", "keyword", "op", "end"]


@dataclass(frozen=True)
class _Token:
    kind: _TokenKind
    text: str
    offset: int
    value: LiteralValue = None

    def describe(self) -> str:
        if self.kind == "end":
            return "end of expression"
        shown = self.text if len(self.text) <= 20 else self.text[:17] + "..."
        if self.kind == "name":
            return f"name '{shown}'"
        if self.kind in ("number", "string"):
            return f"{self.kind} {shown}"
        return f"'{shown}'"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch in _DIGITS or (ch == "." and text[i + 1 : i + 2] in _DIGITS):
            token = _number(text, i)
            tokens.append(token)
            i += len(token.text)
        elif ch in _NAME_START:
            token = _name(text, i)
            tokens.append(token)
            i += len(token.text)
        elif ch in "'\"":
            token = _string(text, i)
            tokens.append(token)
            i += len(token.text)
        else:
            pair = text[i : i + 2]
            op = pair if pair in _OPERATORS or pair in _HINTS else ch
            if op not in _OPERATORS:
                hint = f"; {_HINTS[op]}" if op in _HINTS else ""
                raise ExpressionError(f"unexpected character {op!r}{hint}", i)
            tokens.append(_Token("op", op, i))
            i += len(op)
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _number(text: str, start: int) -> _Token:
    match = _NUMBER.match(text, start)
    assert match is not None  # the caller saw a digit, or a dot and a digit
    lexeme = match.group()
    end = match.end()
    if end < len(text) and (text[end] in _NAME_CHARS or text[end] == "."):
        while end < len(text) and (text[end] in _NAME_CHARS or text[end] == "."):
            end += 1
        raise ExpressionError(f"malformed number '{text[start:end]}'", start)
    if not any(c in lexeme for c in ".eE"):
        return _Token("number", lexeme, start, int(lexeme))
    value = float(lexeme)
    if math.isinf(value):
        raise ExpressionError(f"number {lexeme} is too large", start)
    return _Token("number", lexeme, start, value)


def _name(text: str, start: int) -> _Token:
    match = _NAME.match(text, start)
    assert match is not None  # the caller saw a letter or underscore
    lexeme = match.group()
    if match.end() < len(text) and text[match.end()] == ".":
        raise ExpressionError("'.' must be followed by a name", match.end())
    if lexeme in _KEYWORDS:
        return _Token("keyword", lexeme, start)
    offset = start
    for part in lexeme.split("."):
        if part in _KEYWORDS:
            raise ExpressionError(f"'{part}' is a keyword and cannot be part of a name", offset)
        offset += len(part) + 1
    return _Token("name", lexeme, start)


def _string(text: str, start: int) -> _Token:
    quote = text[start]
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return _Token("string", text[start : i + 1], start, "".join(chars))
        if ch == "\\" and i + 1 < len(text):
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise ExpressionError(f"unknown escape '\\{escaped}' in string", i)
            chars.append(_ESCAPES[escaped])
            i += 2
        else:
            chars.append(ch)
            i += 1
    raise ExpressionError("unterminated string", start)


# --- parsing --------------------------------------------------------------------------------

# Binding powers, loosest first; `not` and unary minus/plus are prefixes.
_OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _SIGN, _ATOM = range(1, 9)
_INFIX: dict[str, int] = {
    "or": _OR,
    "and": _AND,
    **dict.fromkeys(("==", "!=", "<", "<=", ">", ">="), _COMPARE),
    "+": _SUM,
    "-": _SUM,
    "*": _PRODUCT,
    "/": _PRODUCT,
    "%": _PRODUCT,
}


class _Parser:
    """A Pratt parser; each method returns a node and the depth of the tree under it."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.nesting = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "end":
            self.pos += 1
        return token

    def at_op(self, op: str) -> bool:
        token = self.peek()
        return token.kind == "op" and token.text == op

    def expression(self, min_power: int) -> tuple[Expr, int]:
        # Bounded here so that deeply nested input is an error, never a RecursionError.
        if self.nesting > MAX_DEPTH:
            raise _too_deep(self.peek())
        self.nesting += 1
        left, depth = self.prefix(min_power)
        compared = False
        while True:
            token = self.peek()
            power = _INFIX.get(token.text) if token.kind in ("op", "keyword") else None
            if power is None or power <= min_power:
                break
            self.advance()
            if power == _COMPARE:
                if compared:
                    raise ExpressionError(
                        "comparisons cannot be chained; join them with 'and'", token.offset
                    )
                compared = True
            right, right_depth = self.expression(power)
            left, depth = _checked(_infix(token.text, left, right), depth, right_depth, token)
        self.nesting -= 1
        return left, depth

    def prefix(self, min_power: int) -> tuple[Expr, int]:
        token = self.advance()
        if token.kind in ("number", "string"):
            return Literal(token.value), 0
        if token.kind == "keyword" and token.text in _CONSTANTS:
            return Literal(_CONSTANTS[token.text]), 0
        if token.kind == "keyword" and token.text == "not":
            if min_power > _NOT:
                raise ExpressionError("'not' must be in parentheses here", token.offset)
            operand, depth = self.expression(_NOT)
            return _checked(Unary("not", operand), depth, 0, token)
        if token.kind == "name":
            return self.call(token) if self.at_op("(") else (Name(token.text), 0)
        if token.kind == "op" and token.text in ("-", "+"):
            operand, depth = self.expression(_SIGN)
            op: UnaryOp = "-" if token.text == "-" else "+"
            return _checked(Unary(op, operand), depth, 0, token)
        if token.kind == "op" and token.text == "(":
            inner = self.expression(0)
            self.close(token)
            return inner
        raise _unexpected(token)

    def call(self, name: _Token) -> tuple[Expr, int]:
        opening = self.advance()
        args: list[Expr] = []
        depth = 0
        if self.at_op(")"):
            self.advance()
        else:
            while True:
                arg, arg_depth = self.expression(0)
                args.append(arg)
                depth = max(depth, arg_depth)
                if self.at_op(","):
                    self.advance()
                else:
                    self.close(opening, "',' or ')'")
                    break
        return _checked(Call(name.text, tuple(args)), depth, 0, name)

    def close(self, opening: _Token, expected: str = "')'") -> None:
        token = self.advance()
        if token.kind == "end":
            raise ExpressionError("'(' is never closed", opening.offset)
        if not (token.kind == "op" and token.text == ")"):
            raise ExpressionError(f"expected {expected} but found {token.describe()}", token.offset)


def _infix(op: str, left: Expr, right: Expr) -> Expr:
    if op in ("and", "or"):
        return BoolOp(typing.cast(BoolOpName, op), left, right)
    if _INFIX[op] == _COMPARE:
        return Compare(typing.cast(CompareOp, op), left, right)
    return Binary(typing.cast(BinaryOp, op), left, right)


def _checked(node: Expr, depth: int, other_depth: int, token: _Token) -> tuple[Expr, int]:
    # Parentheses are bounded by the parser's nesting count; this bounds long operator chains,
    # which every later recursive walk (evaluate, unparse) would otherwise pay for.
    new_depth = 1 + max(depth, other_depth)
    if new_depth > MAX_DEPTH:
        raise _too_deep(token)
    return node, new_depth


def _too_deep(token: _Token) -> ExpressionError:
    return ExpressionError(f"expression nests more than {MAX_DEPTH} levels deep", token.offset)


def _unexpected(token: _Token) -> ExpressionError:
    return ExpressionError(f"unexpected {token.describe()}", token.offset)


def parse(text: str) -> Expr:
    """Parse an expression; any problem with the text raises ExpressionError, nothing else."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters")
    parser = _Parser(text)
    if parser.peek().kind == "end":
        raise ExpressionError("expression is empty")
    expr, _ = parser.expression(0)
    if parser.peek().kind != "end":
        raise _unexpected(parser.peek())
    return expr


# --- writing --------------------------------------------------------------------------------

_QUOTE = str.maketrans({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"})


def _literal_text(value: LiteralValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"{value} cannot be written as a literal")
        return repr(value)  # the shortest text that reads back as the same float
    return "'" + value.translate(_QUOTE) + "'"


def _power(expr: Expr) -> int:
    if isinstance(expr, BoolOp):
        return _OR if expr.op == "or" else _AND
    if isinstance(expr, Unary):
        return _NOT if expr.op == "not" else _SIGN
    if isinstance(expr, Compare | Binary):
        return _INFIX[expr.op]
    # A negative number reads back as unary minus, so it needs the same parentheses.
    if isinstance(expr, Literal) and _is_number(expr.value) and math.copysign(1, expr.value) < 0:
        return _SIGN
    return _ATOM


def _operand(expr: Expr, power: int, *, strict: bool) -> str:
    text = unparse(expr)
    inner = _power(expr)
    return f"({text})" if inner < power or (strict and inner == power) else text


def unparse(expr: Expr) -> str:
    """Expression text that parses back to the same tree, with only the parentheses it needs."""
    match expr:
        case Literal(value=value):
            return _literal_text(value)
        case Name(name=name):
            return name
        case Call(function=function, args=args):
            return f"{function}({', '.join(unparse(arg) for arg in args)})"
        case Unary(op=op, operand=operand):
            inner = _operand(operand, _power(expr), strict=False)
            return f"not {inner}" if op == "not" else f"{op}{inner}"
        case (
            Binary(op=op, left=left, right=right)
            | Compare(op=op, left=left, right=right)
            | BoolOp(op=op, left=left, right=right)
        ):
            power = _power(expr)
            # Operators group left to right; comparisons do not group at all.
            left_text = _operand(left, power, strict=isinstance(expr, Compare))
            return f"{left_text} {op} {_operand(right, power, strict=True)}"
    raise TypeError(f"not an expression node: {expr!r}")


# --- evaluation -----------------------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _is_number(value: object) -> typing.TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _suggestion(name: str, known: Collection[str], what: str) -> str:
    # Python spellings are the usual mistake; they are names here, not constants.
    python = {"True": "true", "False": "false", "None": "null"}
    if name in python:
        return f" (did you mean '{python[name]}'?)"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if not known:
        return f" (no {what}s are defined here)"
    if len(known) <= 10:
        return f" (known {what}s: {', '.join(sorted(known))})"
    return ""


def _lookup(name: str, variables: Mapping[str, object]) -> object:
    if name in variables:
        return variables[name]
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in variables:
        value = variables[parts[0]]
        for i, part in enumerate(parts[1:], start=1):
            if not isinstance(value, Mapping) or part not in value:
                owner = ".".join(parts[:i])
                raise ExpressionError(f"unknown variable '{name}': '{owner}' has no '{part}'")
            value = value[part]
        return value
    known = [key for key in variables if isinstance(key, str)]
    raise ExpressionError(f"unknown variable '{name}'" + _suggestion(name, known, "variable"))


def _truth(value: object, op: str) -> bool:
    if not isinstance(value, bool):
        raise ExpressionError(f"'{op}' needs true or false, got {_kind(value)}")
    return value


def _arithmetic(op: BinaryOp, left: object, right: object) -> object:
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        return left + right
    if not (_is_number(left) and _is_number(right)):
        raise ExpressionError(f"'{op}' needs two numbers, got {_kind(left)} and {_kind(right)}")
    if op in ("/", "%") and right == 0:
        raise ExpressionError("division by zero" if op == "/" else "modulo by zero")
    try:
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        if op == "/":
            return left / right
        return left % right
    except OverflowError:
        raise ExpressionError(f"the result of '{op}' is too large for a number") from None


def _compare(op: CompareOp, left: object, right: object) -> bool:
    if op in ("==", "!="):
        if _is_number(left) and _is_number(right):
            equal = left == right
        else:
            equal = type(left) is type(right) and bool(left == right)
        return equal if op == "==" else not equal
    if _is_number(left) and _is_number(right):
        pair: tuple[typing.Any, typing.Any] = (left, right)
    elif isinstance(left, str) and isinstance(right, str):
        pair = (left, right)
    else:
        raise ExpressionError(f"cannot compare {_kind(left)} and {_kind(right)} with '{op}'")
    a, b = pair
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


@dataclass(frozen=True)
class FunctionSig:
    """How many arguments a function takes; `max_args=None` means no upper limit."""

    min_args: int = 0
    max_args: int | None = None

    def accepts(self, count: int) -> bool:
        """Whether a call with `count` arguments is allowed."""
        return count >= self.min_args and (self.max_args is None or count <= self.max_args)

    def describe(self) -> str:
        """The rule in words, e.g. 'takes 1 to 3 arguments'."""
        low, high = self.min_args, self.max_args
        if high is None:
            if low == 0:
                return "takes any number of arguments"
            return f"takes at least {low} argument{'s' if low != 1 else ''}"
        if high == 0:
            return "takes no arguments"
        if low == high:
            return f"takes {low} argument{'s' if low != 1 else ''}"
        return f"takes {low} to {high} arguments"

    @classmethod
    def of(cls, function: Callable[..., object]) -> FunctionSig | None:
        """The positional arity of a Python callable, or None when it cannot be read."""
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # some builtins have no signature
            return None
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p for p in parameters if p.kind in kinds]
        required = sum(1 for p in positional if p.default is inspect.Parameter.empty)
        variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
        return cls(required, None if variadic else len(positional))


def _call(node: Call, args: list[object], functions: Functions) -> object:
    function = functions[node.function]
    sig = FunctionSig.of(function)
    if sig is not None and not sig.accepts(len(args)):
        raise ExpressionError(f"{node.function}() {sig.describe()}, got {len(args)}")
    return function(*args)


def _evaluate(expr: Expr, variables: Mapping[str, object], functions: Functions) -> object:
    match expr:
        case Literal(value=value):
            return value
        case Name(name=name):
            return _lookup(name, variables)
        case Call(function=function, args=args):
            if function not in functions:
                known = [key for key in functions if isinstance(key, str)]
                suggestion = _suggestion(function, known, "function")
                raise ExpressionError(f"unknown function '{function}'{suggestion}")
            values = [_evaluate(arg, variables, functions) for arg in args]
            return _call(expr, values, functions)
        case Unary(op="not", operand=operand):
            return not _truth(_evaluate(operand, variables, functions), "not")
        case Unary(op=op, operand=operand):
            number = _evaluate(operand, variables, functions)
            if not _is_number(number):
                raise ExpressionError(f"unary '{op}' needs a number, got {_kind(number)}")
            return -number if op == "-" else +number
        case Binary(op=op, left=left, right=right):
            return _arithmetic(
                op, _evaluate(left, variables, functions), _evaluate(right, variables, functions)
            )
        case Compare(op=op, left=left, right=right):
            return _compare(
                op, _evaluate(left, variables, functions), _evaluate(right, variables, functions)
            )
        case BoolOp(op=op, left=left, right=right):
            first = _truth(_evaluate(left, variables, functions), op)
            if first == (op == "or"):  # short-circuit: true or ..., false and ...
                return first
            return _truth(_evaluate(right, variables, functions), op)
    raise TypeError(f"not an expression node: {expr!r}")


def evaluate(
    expr: Expr, variables: Mapping[str, object], functions: Functions = _NO_FUNCTIONS
) -> object:
    """The value of `expr`; unknown names, type errors or division by zero raise ExpressionError."""
    return _evaluate(expr, variables, functions)


# --- static checks --------------------------------------------------------------------------


def _is_defined(name: str, variables: Collection[str]) -> bool:
    # `hparams` defines every `hparams.x`, as evaluation walks into nested mappings.
    parts = name.split(".")
    return any(".".join(parts[:i]) in variables for i in range(1, len(parts) + 1))


def check(
    expr: Expr,
    *,
    variables: Collection[str],
    functions: Mapping[str, FunctionSig] | Collection[str],
) -> list[str]:
    """Messages for every unknown variable or function and every wrong argument count."""
    known = frozenset(variables)
    messages: dict[str, None] = {}  # ordered and without repeats
    for node in expr.walk():
        if isinstance(node, Name) and not _is_defined(node.name, known):
            message = f"unknown variable '{node.name}'" + _suggestion(node.name, known, "variable")
            messages[message] = None
        elif isinstance(node, Call):
            if node.function not in functions:
                suggestion = _suggestion(node.function, list(functions), "function")
                messages[f"unknown function '{node.function}'{suggestion}"] = None
            elif isinstance(functions, Mapping):
                sig = functions[node.function]
                if not sig.accepts(len(node.args)):
                    messages[f"{node.function}() {sig.describe()}, got {len(node.args)}"] = None
    return list(messages)


# --- templates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A `${{ ... }}` in a text: `text[start:end]` is the whole template, braces included."""

    start: int
    end: int
    expr: Expr


def _template_end(text: str, start: int, opening: int) -> int:
    """The offset of the `}}` closing the template whose expression begins at `start`."""
    i = start
    while i < len(text):
        ch = text[i]
        if ch in "'\"":  # a '}}' inside a string does not close the template
            quote, i = i, i + 1
            while i < len(text) and text[i] != ch:
                i += 2 if text[i] == "\\" else 1
            if i >= len(text):
                raise ExpressionError("unterminated string in '${{ }}'", quote)
            i += 1
        elif text.startswith("}}", i):
            return i
        else:
            i += 1
    raise ExpressionError("'${{' is never closed with '}}'", opening)


def find_templates(text: str) -> list[Template]:
    """Every `${{ expression }}` in `text`; errors carry offsets into the whole text."""
    templates: list[Template] = []
    position = 0
    while (start := text.find("${{", position)) != -1:
        inner = start + 3
        end = _template_end(text, inner, start)
        try:
            expr = parse(text[inner:end])
        except ExpressionError as error:
            offset = start if error.offset is None else inner + error.offset
            raise ExpressionError(error.message, offset) from None
        templates.append(Template(start, end + 2, expr))
        position = end + 2
    return templates


def format_value(value: object) -> str:
    """A value as text for people and commands: `true`, `null`, `0.001`, `32`, strings as-is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return str(value)
    except ValueError:  # ints beyond Python's digit limit for str()
        raise ExpressionError("number too large to write out") from None


def render(text: str, variables: Mapping[str, object], functions: Functions = _NO_FUNCTIONS) -> str:
    """`text` with each `${{ expression }}` replaced by its value."""
    pieces: list[str] = []
    position = 0
    for template in find_templates(text):
        try:
            value = evaluate(template.expr, variables, functions)
        except ExpressionError as error:
            source = text[template.start : template.end]
            raise ExpressionError(f"{error.message} in {source}", template.start) from None
        pieces += (text[position : template.start], format_value(value))
        position = template.end
    pieces.append(text[position:])
    return "".join(pieces)
