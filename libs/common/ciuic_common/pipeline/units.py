"""The units a pipeline file writes as short strings: durations, percentages and byte sizes.

Each parses what a person writes (`1h30m`, `20%`, `8Gi`) and serialises back to a compact string
that parses to the same value, so a spec survives `model_dump(mode="json")` and
`model_validate`.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    GetCoreSchemaHandler,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic_core import core_schema

__all__ = [
    "ByteSize",
    "Duration",
    "Percentage",
    "PositiveDuration",
    "format_byte_size",
    "format_percentage",
    "parse_byte_size",
    "parse_duration",
    "parse_percentage",
]

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DURATION_HINT = "use e.g. 30m, 2h, 1h30m, 90s or 1d"
# Far beyond any sensible timeout; keeps timedelta (and the scheduler's arithmetic) in range.
_MAX_DURATION_S = 366 * 86400


def _shown(value: object) -> str:
    """A value as the person wrote it: text quoted, anything else as is; shortened."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Duration(timedelta):
    """A timedelta that remembers how it was written (`90s` stays `90s`) for display and dumps.

    It compares, hashes and computes like any timedelta, so `Duration.parse("90s") ==
    Duration.parse("1m30s")`.
    """

    __slots__ = ("_text",)
    _text: str

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse `30m`, `2h`, `1h30m`, `90s`, `1d`; raise ValueError with a hint otherwise."""
        return cls._from_seconds(parse_duration(text), text.strip())

    @classmethod
    def of(cls, delta: timedelta) -> Duration:
        """A whole-second timedelta as a Duration, written in its shortest form."""
        seconds = delta.total_seconds()
        if seconds != int(seconds) or seconds < 0:
            raise ValueError(f"{delta} is not a whole, non-negative number of seconds")
        return cls._from_seconds(int(seconds), _compact(int(seconds)))

    @classmethod
    def _from_seconds(cls, seconds: int, text: str) -> Duration:
        made = cls(seconds=seconds)
        made._text = text
        return made

    def __str__(self) -> str:
        return getattr(self, "_text", None) or _compact(int(self.total_seconds()))

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # timedelta's own reduce would rebuild us without the text (copy, deepcopy, pickle).
        return (Duration.parse, (str(self),))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_duration,
            serialization=core_schema.plain_serializer_function_ser_schema(
                str, when_used="json-unless-none"
            ),
            json_schema_input_schema=core_schema.str_schema(),
        )


def parse_duration(text: str) -> int:
    """Seconds in `30m`, `2h`, `1h30m`, `90s`, `1d`; ValueError with a hint otherwise."""
    compact = text.strip()
    match = _DURATION.fullmatch(compact)
    if not compact or match is None:
        raise ValueError(f"{_shown(text)} is not a duration ({_DURATION_HINT})")
    seconds = sum(
        int(amount) * scale
        for amount, scale in zip(match.groups(), _DURATION_UNITS.values(), strict=True)
        if amount is not None
    )
    if seconds > _MAX_DURATION_S:
        raise ValueError(f"{_shown(text)} is longer than a year; {_DURATION_HINT}")
    return seconds


def _compact(seconds: int) -> str:
    parts = []
    for unit, scale in _DURATION_UNITS.items():
        amount, seconds = divmod(seconds, scale)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts) or "0s"


def _positive(value: Duration) -> Duration:
    if not value:
        raise ValueError(f"{_shown(str(value))} is too short: it must be longer than zero")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
"""A Duration longer than zero (timeouts, intervals)."""


def _validate_duration(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    if isinstance(value, timedelta):
        return Duration.of(value)
    if isinstance(value, str):
        return Duration.parse(value)
    # A bare number is refused: seconds or minutes? The file says which with a unit.
    raise ValueError(f"{_shown(value)} is not a duration ({_DURATION_HINT})")


_PERCENT = re.compile(r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%")


def parse_percentage(value: object) -> float:
    """Percent (0-100) from `20%` or a number 0-100; ValueError with a hint otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{_shown(value)} is not a percentage (use e.g. 20%)")
    if isinstance(value, int | float):
        percent = float(value)
    elif isinstance(value, str) and (match := _PERCENT.fullmatch(value.strip())):
        percent = float(match.group(1))
    else:
        raise ValueError(f"{_shown(value)} is not a percentage (use e.g. 20% or 12.5%)")
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise ValueError(f"{_shown(value)} is not between 0% and 100%")
    return percent


def format_percentage(percent: float) -> str:
    """`20%`, `12.5%`: the shortest text that parses back to the same percent."""
    text = repr(float(percent))
    return f"{text.removesuffix('.0')}%"


Percentage = Annotated[
    float,
    BeforeValidator(parse_percentage),
    PlainSerializer(format_percentage, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9.]+%$"}),
]
"""Percent from 0 to 100 as a float (`20%` -> 20.0); a bare number is read as percent too."""


_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kKMGTP]i?|)")
_SIZE_HINT = "use e.g. 512Mi, 8Gi or 1G"


def parse_byte_size(value: object) -> int:
    """Bytes from `8Gi`, `512Mi`, `1G` or a whole number of bytes; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{_shown(value)} is not a size ({_SIZE_HINT})")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, unit = match.groups()
        if unit == "K":
            unit = "k"
        scaled = float(number) * _SIZE_UNITS[unit] if "." in number else None
        size = int(number) * _SIZE_UNITS[unit] if scaled is None else int(scaled)
        if scaled is not None and scaled != size:
            raise ValueError(f"{_shown(value)} is not a whole number of bytes ({_SIZE_HINT})")
    else:
        raise ValueError(f"{_shown(value)} is not a size ({_SIZE_HINT})")
    if size <= 0:
        raise ValueError(f"{_shown(value)}: a size must be more than zero bytes")
    return size


def format_byte_size(size: int) -> str:
    """`8Gi`, `1G`, `1500`: the largest unit that divides the size exactly."""
    best = str(size)
    for unit, scale in sorted(_SIZE_UNITS.items(), key=lambda item: item[1]):
        if unit and unit != "K" and size % scale == 0:
            candidate = f"{size // scale}{unit}"
            if len(candidate) <= len(best):
                best = candidate
    return best


ByteSize = Annotated[
    int,
    BeforeValidator(parse_byte_size),
    PlainSerializer(format_byte_size, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9.]+[kKMGTP]?i?$"}),
]
"""A size in bytes written `8Gi`, `512Mi`, `1G` (binary `Ki..Pi`, decimal `k..P`)."""
