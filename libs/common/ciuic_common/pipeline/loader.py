"""Reading `.ciuicci.yaml`: YAML with a position for every key, value and list item, then the
models; every problem comes back at once, located at a 1-based line and column.

The file comes from a push anyone can make, so reading it is bounded: its size, its nesting, the
number of nodes and the values aliases expand to. Whatever the input, `load_pipeline` returns a
Pipeline or raises PipelineSpecError; nothing else escapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ciuic_common.errors import InvalidArgument
from ciuic_common.events import SpecIssue
from ciuic_common.pipeline.models import (
    KIND_MESSAGES,
    MODELS_CONTEXT_KEY,
    SPEC_ERROR,
    Pipeline,
    SpecModel,
    SpecPath,
)
from ciuic_common.pipeline.references import closest

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_ISSUES",
    "MAX_NODES",
    "MAX_VALUES",
    "PipelineSpecError",
    "load_pipeline",
]

#: Larger files are refused unread; a pipeline file is a few kilobytes, and pure-Python YAML
#: reads about 400 KB a second at worst.
MAX_FILE_BYTES: Final = 256 * 1024
#: Mappings and lists nested deeper than this are refused (the seed needs 5).
MAX_DEPTH: Final = 64
#: Nodes (keys, values, items) the file may hold as written.
MAX_NODES: Final = 20_000
#: Problems reported at most; the rest are counted in one last line.
MAX_ISSUES: Final = 100
#: Values the file may expand to once aliases are followed ("billion laughs" stop here).
MAX_VALUES: Final = 20_000

_YAML_TAGS = "tag:yaml.org,2002:"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_NULL_TAG = "tag:yaml.org,2002:null"


class PipelineSpecError(InvalidArgument):
    """A pipeline file that does not validate, with every problem found, located."""

    def __init__(self, filename: str, issues: Iterable[SpecIssue]) -> None:
        self.filename = filename
        ordered = sorted(issues, key=lambda i: (i.line or 0, i.column or 0, i.path, i.message))
        if len(ordered) > MAX_ISSUES:
            rest = ordered[MAX_ISSUES]
            more = SpecIssue(
                path="",
                line=rest.line,
                column=rest.column,
                message=f"{len(ordered) - MAX_ISSUES} more problems not shown",
            )
            ordered = [*ordered[:MAX_ISSUES], more]
        self.issues: list[SpecIssue] = ordered
        super().__init__(self.format())

    def __reduce__(self) -> tuple[Any, ...]:
        # Survives a process pool: rebuilt from its parts, not from the formatted message.
        return (type(self), (self.filename, self.issues))

    def format(self) -> str:
        """One line per issue: `FILE:LINE:COL: path: message`."""
        return "\n".join(_format_issue(self.filename, issue) for issue in self.issues)


def _format_issue(filename: str, issue: SpecIssue) -> str:
    where = filename
    if issue.line is not None:
        where += f":{issue.line}:{issue.column or 1}"
    return f"{where}: {issue.path}: {issue.message}" if issue.path else f"{where}: {issue.message}"


# ---------------------------------------------------------------------------------------------
# YAML with positions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Where:
    """Where one key/value or list item sits in the file (1-based line, column)."""

    key: tuple[int, int] | None
    value: tuple[int, int] | None
    #: For a single-line scalar whose characters are the value's own: the column of its first
    #: character, so an offset into the value maps to a column.
    text_column: int | None = None


@dataclass
class _Document:
    data: Any
    positions: dict[SpecPath, _Where]
    issues: list[SpecIssue] = field(default_factory=list)


class _Refused(Exception):
    """Reading stops here: the file is over a limit."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that composes within limits; values are built by `_Builder` from the nodes."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._nodes = 0

    # PyYAML's scanner does work per open bracket for every token, so `[[[[...` thousands deep
    # is quadratic; it is refused as the brackets open, before the composer sees it.
    def fetch_flow_sequence_start(self) -> None:
        self._check_flow_level()
        super().fetch_flow_sequence_start()

    def fetch_flow_mapping_start(self) -> None:
        self._check_flow_level()
        super().fetch_flow_mapping_start()

    def _check_flow_level(self) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(
                f"nesting deeper than {MAX_DEPTH} levels",
                self.get_mark(),
            )

    def _here(self) -> yaml.Mark:
        return self.peek_event().start_mark  # type: ignore[no-untyped-call, no-any-return]

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(
                f"the file has more than {MAX_NODES} keys, values and items; a pipeline file "
                "is far smaller",
                self._here(),
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_DEPTH} levels", self._here())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.1 (PyYAML) reads `1e-3` as a string; a learning rate written that way must be a number.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1)


def _path_text(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part):
            text += f".{part}" if text else part
        else:
            text += f"[{_shown(part)}]"
    return text


class _Builder:
    """Builds plain values from composed nodes, noting where each path sits in the file."""

    def __init__(self, loader: _Loader, text: str) -> None:
        self.loader = loader
        self.text = text
        self.positions: dict[SpecPath, _Where] = {}
        self.issues: list[SpecIssue] = []
        self.values = 0
        self.active: set[int] = set()

    def issue(self, path: SpecPath, mark: yaml.Mark, message: str) -> None:
        line, column = _position(mark)
        self.issues.append(
            SpecIssue(path=_path_text(path), line=line, column=column, message=message)
        )

    def build(self, node: Node, path: SpecPath) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Refused(
                f"the file expands to more than {MAX_VALUES} values (aliases repeating "
                "aliases?); write it out plainly",
                node.start_mark,
            )
        if len(path) > MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH} levels", node.start_mark)
        if id(node) in self.active:
            raise _Refused("an alias refers to a node that contains it", node.start_mark)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
        finally:
            self.active.discard(id(node))
        raise _Refused("unsupported YAML node", node.start_mark)  # pragma: no cover

    def _scalar(self, node: ScalarNode, path: SpecPath) -> Any:
        try:
            return self.loader.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            self.issue(path, node.start_mark, _yaml_problem(exc))
        except (ValueError, OverflowError, TypeError) as exc:
            # PyYAML lets some bad scalars through as plain exceptions (`!!int x`, 2024-13-45).
            self.issue(
                path,
                node.start_mark,
                f"{_shown(node.value)} cannot be read as {_tag_name(node.tag)}: {exc}",
            )
        return None

    def _sequence(self, node: SequenceNode, path: SpecPath) -> list[Any]:
        if node.tag != _SEQ_TAG:
            self.issue(
                path, node.start_mark, f"the tag {_tag_name(node.tag)} is not supported here"
            )
        items = []
        for index, item in enumerate(node.value):
            self.positions[(*path, index)] = _Where(
                key=None, value=_position(item.start_mark), text_column=self._text_column(item)
            )
            items.append(self.build(item, (*path, index)))
        return items

    def _mapping(self, node: MappingNode, path: SpecPath) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            self.issue(
                path, node.start_mark, f"the tag {_tag_name(node.tag)} is not supported here"
            )
        result: dict[str, Any] = {}
        first_at: dict[str, yaml.Mark] = {}
        merged: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged += self._merged_pairs(value_node, path)
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in first_at:
                line = first_at[key].line + 1
                self.issue(
                    (*path, key),
                    key_node.start_mark,
                    f"duplicate key {_shown(key)} (first at line {line}); YAML keeps only one",
                )
                continue
            first_at[key] = key_node.start_mark
            result[key] = self._entry(key_node, value_node, (*path, key))
        # `<<: *defaults` fills in the keys the mapping does not set itself; earlier merges win.
        for key_node, value_node in merged:
            key = self._key(key_node, path)
            if key is not None and key not in result:
                first_at[key] = key_node.start_mark
                result[key] = self._entry(key_node, value_node, (*path, key))
        return result

    def _entry(self, key_node: Node, value_node: Node, path: SpecPath) -> Any:
        implicit_null = (
            isinstance(value_node, ScalarNode)
            and value_node.tag == _NULL_TAG
            and value_node.value == ""
        )
        self.positions[path] = _Where(
            key=_position(key_node.start_mark),
            value=None if implicit_null else _position(value_node.start_mark),
            text_column=self._text_column(value_node),
        )
        return self.build(value_node, path)

    def _merged_pairs(self, node: Node, path: SpecPath) -> list[tuple[Node, Node]]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        pairs: list[tuple[Node, Node]] = []
        for source in sources:
            if not isinstance(source, MappingNode):
                self.issue(path, source.start_mark, "`<<` merges a mapping (or a list of them)")
                continue
            if id(source) in self.active:
                raise _Refused("a `<<` merge refers to a mapping that contains it", node.start_mark)
            self.values += len(source.value)
            if self.values > MAX_VALUES:
                raise _Refused(
                    f"the file expands to more than {MAX_VALUES} values (merges repeating "
                    "merges?); write it out plainly",
                    node.start_mark,
                )
            self.active.add(id(source))
            try:
                for key_node, value_node in source.value:
                    if key_node.tag == _MERGE_TAG:
                        pairs += self._merged_pairs(value_node, path)
                    else:
                        pairs.append((key_node, value_node))
            finally:
                self.active.discard(id(source))
        return pairs

    def _key(self, node: Node, path: SpecPath) -> str | None:
        if not isinstance(node, ScalarNode):
            self.issue(path, node.start_mark, "a key must be plain text, not a list or mapping")
            return None
        key = self._scalar(node, path)
        if isinstance(key, str):
            return key
        if key is not None or node.value:
            shown = "true/false" if isinstance(key, bool) else "null" if key is None else repr(key)
            self.issue(
                path,
                node.start_mark,
                f"the key {_shown(node.value)} reads as {shown}, not text; quote it",
            )
        else:
            self.issue(path, node.start_mark, "a key is empty")
        return None

    def _text_column(self, node: Node) -> int | None:
        """The column of the value's first character when offsets in it map to columns."""
        if not isinstance(node, ScalarNode) or node.start_mark.line != node.end_mark.line:
            return None
        raw = self.text[node.start_mark.index : node.end_mark.index]
        column = node.start_mark.column + 1
        if raw == node.value:
            return column
        if len(raw) >= 2 and raw[0] in "'\"" and raw[-1] == raw[0] and raw[1:-1] == node.value:
            return column + 1
        return None


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML_TAGS) if tag.startswith(_YAML_TAGS) else tag


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or "invalid YAML"
    if exc.context == "expected a single document in the stream":
        return "a second YAML document ('---'): a pipeline file holds one"
    if "'\\t'" in problem:
        return "a tab character: YAML indents with spaces only"
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        if exc.context_mark.line != exc.problem_mark.line:
            return f"{problem} ({exc.context} at line {exc.context_mark.line + 1})"
        return f"{problem} ({exc.context})"
    return problem


def _decode(source: str | bytes, filename: str) -> str:
    size = len(source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source)
    if size > MAX_FILE_BYTES:
        raise PipelineSpecError(
            filename,
            [
                SpecIssue(
                    path="",
                    line=1,
                    column=1,
                    message=f"the file is {size} bytes; a pipeline file may be at most "
                    f"{MAX_FILE_BYTES} bytes",
                )
            ],
        )
    if isinstance(source, str):
        return source.removeprefix("\ufeff")
    try:
        return source.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = source[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
        raise PipelineSpecError(
            filename,
            [
                SpecIssue(
                    path="",
                    line=line,
                    column=column,
                    message=f"the file is not UTF-8 text (byte 0x{source[exc.start]:02x})",
                )
            ],
        ) from None


def _line_column(text: str, index: int) -> tuple[int, int]:
    before = text[:index]
    return before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1


def _reader_problem(filename: str, text: str, exc: yaml.reader.ReaderError) -> PipelineSpecError:
    line, column = _line_column(text, exc.position)
    character = (
        exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    )
    message = f"the character U+{character:04X} is not allowed in YAML (a control character?)"
    return PipelineSpecError(
        filename, [SpecIssue(path="", line=line, column=column, message=message)]
    )


def _parse(source: str | bytes, filename: str) -> _Document:
    """The file as plain data with positions; PipelineSpecError when it cannot be read."""
    text = _decode(source, filename)

    def refuse(message: str, mark: yaml.Mark | None) -> PipelineSpecError:
        line, column = _position(mark) if mark is not None else (1, 1)
        return PipelineSpecError(
            filename, [SpecIssue(path="", line=line, column=column, message=message)]
        )

    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        raise _reader_problem(filename, text, exc) from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise refuse("the file is empty: a pipeline needs jobs or a training section", None)
        builder = _Builder(loader, text)
        data = builder.build(root, ())
    except _Refused as exc:
        raise refuse(exc.message, exc.mark) from None
    except yaml.MarkedYAMLError as exc:
        raise refuse(_yaml_problem(exc), exc.problem_mark or exc.context_mark) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_problem(filename, text, exc) from None
    except yaml.YAMLError as exc:  # any other PyYAML error: still the file's fault
        raise refuse(f"invalid YAML: {exc}", None) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {_shown(data)}"
        raise refuse(
            f"the top level must be a mapping of sections (triggers, jobs, training, ...), "
            f"not {kind}",
            root.start_mark,
        )
    positions = builder.positions
    positions[()] = _Where(key=None, value=_position(root.start_mark))
    return _Document(data, positions, builder.issues)


# ---------------------------------------------------------------------------------------------
# validation errors -> located issues
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Located:
    raw_path: SpecPath  # the part of the error's path that exists in the file
    display: SpecPath  # what the person sees: raw_path plus missing keys, without tags
    parent: Any  # complete: what holds the last element; else the last value found
    complete: bool  # every element of the error's path exists in the file
    key_error: bool  # the error is about a mapping's key, not its value


def _has(raw: Any, part: str | int) -> bool:
    if isinstance(raw, dict):
        return isinstance(part, str) and part in raw
    return isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw)


def _walk(data: Any, loc: Sequence[str | int]) -> _Located:
    raw: Any = data
    parent: Any = None
    found: list[str | int] = []
    display: list[str | int] = []
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if part == "[key]":
            return _Located(tuple(found), tuple(display), parent, True, True)
        if _has(raw, part):
            parent, raw = raw, raw[part]
        elif isinstance(part, str) and not last and isinstance(raw, dict):
            continue  # a union's tag or a key a model gathered (alert params): not in the file
        else:
            display.extend(loc[index:])
            return _Located(tuple(found), tuple(display), raw, False, False)
        found.append(part)
        display.append(part)
    return _Located(tuple(found), tuple(display), parent, True, False)


def _locate(
    document: _Document, located: _Located, *, at_key: bool, offset: int | None = None
) -> tuple[int, int]:
    positions = document.positions
    if located.complete:
        where = positions.get(located.raw_path)
        if where is not None:
            if offset is not None and where.text_column is not None and where.value:
                return (where.value[0], where.text_column + offset)
            if at_key or located.key_error:
                return where.key or where.value or (1, 1)
            return where.value or where.key or (1, 1)
    if not isinstance(located.parent, dict | list):
        # The path goes on inside a scalar written as shorthand (`needs: build`): the scalar.
        where = positions.get(located.raw_path)
        if where is not None:
            return where.value or where.key or (1, 1)
    # A key is missing: point at the closest enclosing thing that exists, its key first.
    for end in range(len(located.raw_path), -1, -1):
        where = positions.get(located.raw_path[:end])
        if where is not None:
            return where.key or where.value or (1, 1)
    return (1, 1)


def _shown(value: object) -> str:
    """A value as the person wrote it: text quoted, anything else as is; shortened."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KIND = {
    dict: "a mapping",
    list: "a list",
    str: "text",
    bool: "true/false",
    int: "a number",
    float: "a number",
}


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return _KIND.get(type(value), type(value).__name__)


def _message(error: ErrorDetails, located: _Located, models: dict[int, type[BaseModel]]) -> str:
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    key = next((p for p in reversed(located.display) if isinstance(p, str)), "")
    if kind == "extra_forbidden":
        model = models.get(id(located.parent))
        if model is not None and issubclass(model, SpecModel):
            return model.unknown_key_message(str(key), value)
        return f"unknown key {_shown(key)}"
    if kind == "missing":
        return f"required key {_shown(key)} is missing"
    if kind in KIND_MESSAGES:
        return KIND_MESSAGES[kind](value)
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        match = closest(str(value), choices) if isinstance(value, str) else None
        hint = f" (did you mean {match!r}?)" if match else ""
        if key == "type":
            return f"unsupported type {_shown(value)}{hint}; supported: {', '.join(choices)}"
        return f"{_shown(value)} is not allowed here{hint}; expected one of: {', '.join(choices)}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    if kind == "string_type":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"must be text, not the number {value!r}; quote it: '{value}'"
        if isinstance(value, bool):
            return "must be text, not true/false (YAML reads yes/no/on/off as booleans); quote it"
        return f"must be text, not {_kind(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, not {_kind(value)} {_shown(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, not {_kind(value)} {_shown(value)}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, not {_shown(value)}"
    if kind == "list_type":
        return f"must be a list, not {_kind(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (key: value lines), not {_kind(value)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s)"
    if kind == "too_long":
        return f"may have at most {ctx.get('max_length')} item(s)"
    bounds = {
        "greater_than": "greater than {gt}",
        "greater_than_equal": "at least {ge}",
        "less_than": "less than {lt}",
        "less_than_equal": "at most {le}",
    }
    if kind in bounds:
        return f"must be {bounds[kind].format(**ctx)}, not {value!r}"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return error["msg"]
    return error["msg"][:1].lower() + error["msg"][1:]


def _issues(exc: ValidationError, document: _Document, context: dict[str, Any]) -> list[SpecIssue]:
    models: dict[int, type[BaseModel]] = context.get(MODELS_CONTEXT_KEY, {})
    issues: list[SpecIssue] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == SPEC_ERROR:
            for relative, offset, message in error.get("ctx", {}).get("issues", ()):
                located = _walk(document.data, (*loc, *relative))
                line, column = _locate(document, located, at_key=False, offset=offset)
                issues.append(
                    SpecIssue(
                        path=_path_text(located.display), line=line, column=column, message=message
                    )
                )
            continue
        located = _walk(document.data, loc)
        message = _message(error, located, models)
        at_key = error["type"] == "extra_forbidden"
        line, column = _locate(document, located, at_key=at_key)
        issues.append(
            SpecIssue(path=_path_text(located.display), line=line, column=column, message=message)
        )
    return issues


def load_pipeline(source: str | bytes, *, filename: str = ".ciuicci.yaml") -> Pipeline:
    """Parse and validate a pipeline file; raise PipelineSpecError listing every problem."""
    document = _parse(source, filename)
    context: dict[str, Any] = {}
    try:
        pipeline = Pipeline.model_validate(document.data, context=context)
    except ValidationError as exc:
        raise PipelineSpecError(
            filename, [*document.issues, *_issues(exc, document, context)]
        ) from None
    except RecursionError:
        raise PipelineSpecError(
            filename, [SpecIssue(path="", line=1, column=1, message="the file nests too deeply")]
        ) from None
    if document.issues:
        raise PipelineSpecError(filename, document.issues)
    return pipeline
