"""Checked settings tables: every key's type, range and allowed values, one line per problem.

Why one module: study files (pm_common.study.config), data contracts, image specs, the simulation table
and a hospital's `site.toml` are all TOML written by people, or sent by a coordinator nobody at the
site controls. TOML has its own types, and Python's would let bad values through: a TOML `true` is
a Python int, `nan` and `inf` are floats, integers may be any size. Each rule here says in words
what it accepts, so a refusal names the place (`[training].batch_size`), what was found and what is
allowed, and every problem of a file is collected before anything starts.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""Names that end up in file and directory names (studies, sites): no separators, no `..`."""
MAX_SHOWN = 40  # characters of a found text quoted in a refusal


class InputError(ValueError):
    """Input pmfl refuses before anything starts; `problems` holds one line per problem.

    `str(error)` is the problems, one per line, each prefixed with `source` (e.g. the file)."""

    def __init__(self, problems: str | Sequence[str], source: object = None) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source is not None else ""
        super().__init__("\n".join(prefix + problem for problem in self.problems) or "invalid input")


def read_toml(path: Path, missing_hint: str = "") -> dict[str, Any]:
    """A settings file as TOML, or one line that says why it cannot be read.

    Why one reader: study files, contracts, a site's `site.toml` and the coordinator's settings are
    all read the same way, and each refusal must be one line naming the file (never a traceback).

    Args:
        path: the file.
        missing_hint: appended to the refusal when the file does not exist (what creates it).

    Returns:
        The file's tables.

    Raises:
        InputError: the file is missing, unreadable or not TOML; one problem, prefixed with the path.
    """
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"not found{missing_hint}", source=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", source=path) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise InputError(f"cannot be read ({exc.__class__.__name__})", source=path) from None


class Refused(Exception):
    """Raised by a rule: `text` replaces the default "got ...; expected ..." when given."""

    def __init__(self, text: str | None = None) -> None:
        super().__init__(text or "")
        self.text = text


def show(value: Any) -> str:
    """A found value as a refusal quotes it: short, on one line, with its TOML type when that helps.

    Args:
        value: a value as tomllib loaded it.

    Returns:
        e.g. `"abc" (text)`, `true (a boolean)`, `nan`, `an integer of 31 digits`, `a table`.
    """
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, int):
        digits = str(value)
        return digits if len(digits) <= 24 else f"an integer of {len(digits.lstrip('-'))} digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        text = json.dumps(value[:MAX_SHOWN], ensure_ascii=True)
        return f"{text}{'...' if len(value) > MAX_SHOWN else ''} (text)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    return f"a {type(value).__name__}"


def quote_name(name: Any) -> str:
    """A name (site, feature) inside a place: 'cleveland', or JSON-quoted when it is unusual.

    Args:
        name: the entry's name as found.

    Returns:
        The name quoted, on one line, at most 64 characters of it.
    """
    text = str(name)
    if text.isprintable() and "'" not in text and len(text) <= 64:
        return f"'{text}'"
    return json.dumps(text[:64], ensure_ascii=True)


def key_place(place: str, key: Any) -> str:
    """`[training]` and `batch_size` give `[training].batch_size`; odd keys are JSON-quoted."""
    text = str(key)
    bare = text if BARE_KEY.match(text) and len(text) <= 64 else json.dumps(text[:64], ensure_ascii=True)
    return f"{place}.{bare}"


def table_place(name: Any) -> str:
    """A top-level table as a refusal names it: `[privacy]`, or `["odd name"]`."""
    text = str(name)
    if BARE_KEY.match(text) and len(text) <= 64:
        return f"[{text}]"
    return f"[{json.dumps(text[:64], ensure_ascii=True)}]"


class Rule:
    """What one setting accepts. `check` returns the value as pmfl uses it or raises Refused."""

    def expects(self) -> str:  # pragma: no cover - every rule overrides it
        raise NotImplementedError

    def check(self, value: Any) -> Any:  # pragma: no cover - every rule overrides it
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Integer(Rule):
    """A whole number in [low, high]; a TOML bool or 2.0 is not one."""

    low: int
    high: int

    def expects(self) -> str:
        return f"an integer from {self.low} to {self.high}"

    def check(self, value: Any) -> int:
        if not _is_int(value) or not self.low <= value <= self.high:
            raise Refused
        return int(value)


@dataclass(frozen=True)
class Number(Rule):
    """A finite number (TOML integer or float) between low and high, each bound open or closed."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def expects(self) -> str:
        lower = f"> {_num(self.low)}" if self.low_open else f">= {_num(self.low)}"
        upper = f"< {_num(self.high)}" if self.high_open else f"<= {_num(self.high)}"
        return f"a finite number {lower} and {upper}"

    def check(self, value: Any) -> float:
        if not _is_number(value):
            raise Refused
        number = float(value) if abs(value) < 1e308 else math.inf  # huge TOML integers included
        if not math.isfinite(number):
            raise Refused
        above = number > self.low if self.low_open else number >= self.low
        below = number < self.high if self.high_open else number <= self.high
        if not (above and below):
            raise Refused
        return number


@dataclass(frozen=True)
class Boolean(Rule):
    def expects(self) -> str:
        return "true or false"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Refused
        return value


@dataclass(frozen=True)
class Choice(Rule):
    """One of a few values, compared with their type: `1` is not `"1"`, `true` is not `1`."""

    values: tuple[Any, ...]

    def expects(self) -> str:
        return "one of " + ", ".join(json.dumps(v) for v in self.values)

    def check(self, value: Any) -> Any:
        for allowed in self.values:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise Refused


@dataclass(frozen=True)
class Text(Rule):
    """Printable text (no line breaks or control characters) of bounded length, optionally a name."""

    max_length: int = 200
    min_length: int = 1
    pattern: re.Pattern[str] | None = None
    what: str = "text"

    def expects(self) -> str:
        if self.pattern is NAME_PATTERN:
            return (f"a name of letters, digits, '.', '_' or '-' (at most {self.max_length} characters, "
                    "starting with a letter or digit)")
        low, high = self.min_length, self.max_length
        length = f"at most {high}" if low <= 0 else f"{low} to {high}"
        return f"{self.what} of {length} printable characters"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not self.min_length <= len(value) <= self.max_length:
            raise Refused
        if not value.isprintable() or (self.pattern is not None and not self.pattern.match(value)):
            raise Refused
        return value


@dataclass(frozen=True)
class Nested(Rule):
    """A key whose value has rules of its own (a sub-table, an array of tables), checked apart."""

    description: str

    def expects(self) -> str:
        return self.description

    def check(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class AnyOf(Rule):
    """The first of `rules` that accepts the value."""

    rules: tuple[Rule, ...]
    description: str

    def expects(self) -> str:
        return self.description

    def check(self, value: Any) -> Any:
        for rule in self.rules:
            try:
                return rule.check(value)
            except Refused:
                continue
        raise Refused


@dataclass(frozen=True)
class Items(Rule):
    """An array of `min_items` to `max_items` values that each pass `item`; optionally distinct."""

    item: Rule
    min_items: int = 0
    max_items: int = 1000
    unique: bool = False

    def expects(self) -> str:
        count = (f"{self.min_items} to {self.max_items}" if self.min_items else f"at most {self.max_items}")
        distinct = ", distinct" if self.unique else ""
        return f"an array of {count} item(s){distinct}, each {self.item.expects()}"

    def check(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or not self.min_items <= len(value) <= self.max_items:
            raise Refused
        checked = []
        for i, item in enumerate(value):
            try:
                checked.append(self.item.check(item))
            except Refused as exc:
                raise Refused(
                    exc.text or f"got {show(item)} as item {i + 1}; expected {self.item.expects()}"
                ) from None
        if self.unique and len({str(v).casefold() for v in checked}) != len(checked):
            raise Refused(f"got duplicate items; expected {self.expects()}")
        return tuple(checked)


def refusal(place: str, value: Any, rule: Rule, exc: Refused) -> str:
    """The one line that says what is wrong at `place`."""
    return f"{place}: {exc.text}" if exc.text else f"{place}: got {show(value)}; expected {rule.expects()}"


def check_table(
    table: Any,
    rules: Mapping[str, Rule],
    place: str,
    problems: list[str],
    *,
    required: Iterable[str] = (),
) -> dict[str, Any] | None:
    """Check every key of `table` against `rules`; append one line per problem to `problems`.

    Unknown keys are refused with the allowed keys listed: a typo never goes unnoticed.

    Args:
        table: the table as loaded (anything: a hostile file may hold a number where a table goes).
        rules: what each allowed key accepts.
        place: how refusals name the table, e.g. `[training]` or `[[sites]] 'cleveland'`.
        problems: where each problem's line is appended.
        required: keys that must be present.

    Returns:
        The accepted values (keys that passed), or None when `table` is not a table at all.
    """
    if not isinstance(table, Mapping):
        problems.append(f"{place}: got {show(table)}; expected a table")
        return None
    accepted: dict[str, Any] = {}
    for key, value in table.items():
        rule = rules.get(key)
        if rule is None:
            problems.append(f"{key_place(place, key)}: unknown key; allowed: {', '.join(sorted(rules))}")
            continue
        try:
            accepted[key] = rule.check(value)
        except Refused as exc:
            problems.append(refusal(key_place(place, key), value, rule, exc))
    for key in required:
        if key not in table:
            problems.append(f"{key_place(place, key)}: missing; expected {rules[key].expects()}")
    return accepted


def check_value(value: Any, rule: Rule, place: str, problems: list[str]) -> Any:
    """Check one value against `rule`.

    Args:
        value: the value as loaded.
        rule: what it must be.
        place: how a refusal names it, e.g. `[images].size`.
        problems: where a refusal's line is appended.

    Returns:
        The value as pmfl uses it, or None (and a line in `problems`) when it is refused.
    """
    try:
        return rule.check(value)
    except Refused as exc:
        problems.append(refusal(place, value, rule, exc))
        return None
