"""What a tabular study predicts: the `[contract] target` forms beyond yes/no, checked and encoded.

The form of the target table says the task (`[study] task` is inferred from it when omitted):

- `{ name, positive, negative }`: binary-classification (pm_common.data.contract.Target);
- `{ name, classes = [...] }`: multiclass-classification, one class index per row;
- `{ name, type = "numeric", min, max, unit }`: regression, the value mapped from the declared range
  onto [-1, 1] identically at every site (no site statistics, so nothing about a site's data leaks
  into its preprocessing);
- `{ time, event, event_values, censored_values, time_unit, intervals, horizons }`: survival.
  `intervals` are the upper ends of the discrete-time grid (in `time_unit`): interval k covers
  (intervals[k-1], intervals[k]]; a follow-up longer than the last end is censored there.
  `horizons` (default: the interval ends) are where the Brier score is evaluated.

Refusals of a data cell name the file, the data row and the column, and the allowed values only:
never the cell's own value (it is patient data).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pm_common.study.schema import AnyOf, Choice, Integer, Items, Number, Rule, Text, check_table

BINARY = "binary-classification"
MULTICLASS = "multiclass-classification"
REGRESSION = "regression"
SURVIVAL = "survival"
TABULAR_TASKS = (BINARY, MULTICLASS, REGRESSION, SURVIVAL)
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MAX_CLASSES = 100
MAX_INTERVALS = 200
MAX_ABS_BOUND = 1e15

_NAME = Text(max_length=200, what="a column name")
_CODE = AnyOf((Text(max_length=200), Integer(-(2**63), 2**63 - 1), Number(-MAX_ABS_BOUND, MAX_ABS_BOUND)),
              "text, an integer or a finite number")
_TIME = Number(0, MAX_ABS_BOUND, low_open=True)
CLASS_RULES: dict[str, Rule] = {"name": _NAME, "classes": Items(_CODE, 2, MAX_CLASSES, unique=True)}
NUMERIC_TARGET_RULES: dict[str, Rule] = {
    "name": _NAME, "type": Choice(("numeric",)), "min": Number(-MAX_ABS_BOUND, MAX_ABS_BOUND),
    "max": Number(-MAX_ABS_BOUND, MAX_ABS_BOUND), "unit": Text(max_length=40, min_length=0),
}
SURVIVAL_RULES: dict[str, Rule] = {
    "time": _NAME, "event": _NAME, "event_values": Items(_CODE, 1, 100),
    "censored_values": Items(_CODE, 1, 100),
    "time_unit": Text(max_length=40, min_length=0), "intervals": Items(_TIME, 1, MAX_INTERVALS),
    "horizons": Items(_TIME, 1, MAX_INTERVALS),
}
FORMS = (f"{{ name, positive, negative }} ({BINARY}), {{ name, classes }} ({MULTICLASS}), "
         f"{{ name, type = \"numeric\", min, max, unit }} ({REGRESSION}), "
         f"{{ time, event, event_values, censored_values, time_unit, intervals, horizons }} ({SURVIVAL})")


def canonical_label(raw: Any) -> str:
    """A label as text, numbers canonical: '1.0', '1' and 1 are the same code; text kept as written."""
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def is_missing(raw: str) -> bool:
    """True for the tokens exports use for an empty cell."""
    return str(raw).strip().casefold() in MISSING_TOKENS


BadCell = tuple[int, str, str]
"""A refused target cell: (data row, 1-based below the header; column; what is wrong and what is
allowed). Never the cell's value: the tabular reader groups these per column and kind."""


def task_of_target(table: Any) -> str | None:
    """The task a target table's form declares, or None when it matches no form."""
    if not isinstance(table, Mapping):
        return None
    if "time" in table or "event" in table:
        return SURVIVAL
    if "classes" in table:
        return MULTICLASS
    if table.get("type") == "numeric":
        return REGRESSION
    if "positive" in table or "negative" in table:
        return BINARY
    return None


@dataclass(frozen=True)
class ClassTarget:
    """Several classes: each row's code must be one of `classes` (as text, numbers canonical)."""

    name: str
    classes: tuple[str, ...]
    task = MULTICLASS

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.name,)

    numeric_columns: tuple[str, ...] = ()  # class codes are matched as text (numbers canonical)

    def encode(self, frame: Any) -> tuple[np.ndarray, list[BadCell]]:
        """Class index per row (float32) and the refused cells."""
        index = {c: i for i, c in enumerate(self.classes)}
        y = np.zeros(len(frame), dtype=np.float32)
        problems: list[BadCell] = []
        for row, raw in enumerate(frame[self.name].tolist(), start=1):
            label = None if is_missing(raw) else index.get(canonical_label(raw))
            if label is None:
                what = "missing" if is_missing(raw) else "not a declared class"
                problems.append((row, self.name, f"{what}; allowed: {list(self.classes)}"))
            else:
                y[row - 1] = label
        return y, problems


@dataclass(frozen=True)
class NumericTarget:
    """A continuous outcome within a declared range, scaled onto [-1, 1] by that range alone."""

    name: str
    min: float
    max: float
    unit: str = ""
    task = REGRESSION

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """Columns read as numbers in the site's own number format (tabular.py rewrites them first)."""
        return (self.name,)

    def scale(self, value: np.ndarray) -> np.ndarray:
        """The declared range onto [-1, 1]: the same map at every site."""
        return (value - (self.max + self.min) / 2.0) / ((self.max - self.min) / 2.0)

    def unscale(self, value: np.ndarray) -> np.ndarray:
        """`scale`'s inverse: back to the target's unit."""
        return value * ((self.max - self.min) / 2.0) + (self.max + self.min) / 2.0

    def encode(self, frame: Any) -> tuple[np.ndarray, list[BadCell]]:
        """Scaled value per row (float32) and the refused cells."""
        y = np.zeros(len(frame), dtype=np.float32)
        problems: list[BadCell] = []
        allowed = f"a number in [{self.min:g}, {self.max:g}]" + (f" {self.unit}" if self.unit else "")
        for row, raw in enumerate(frame[self.name].tolist(), start=1):
            number = _number(raw)
            if number is None or not self.min <= number <= self.max:
                what = ("missing" if is_missing(raw) else "not a number" if number is None
                        else "outside the declared range")
                problems.append((row, self.name, f"{what}; allowed: {allowed}"))
            else:
                y[row - 1] = self.scale(np.asarray(number, dtype=np.float32))
        return y, problems


@dataclass(frozen=True)
class SurvivalTarget:
    """Time to event with censoring, on a discrete-time grid the study declares."""

    time: str
    event: str
    event_values: tuple[str, ...]
    censored_values: tuple[str, ...]
    intervals: tuple[float, ...]
    horizons: tuple[float, ...]
    time_unit: str = ""
    task = SURVIVAL

    @property
    def name(self) -> str:
        return self.time

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.time, self.event)

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """Columns read as numbers in the site's own number format (tabular.py rewrites them first)."""
        return (self.time,)

    def encode(self, frame: Any) -> tuple[np.ndarray, list[BadCell]]:
        """(time, event 0/1) per row, shape (n, 2) float32, and the refused cells."""
        y = np.zeros((len(frame), 2), dtype=np.float32)
        problems: list[BadCell] = []
        codes = {**{c: 1.0 for c in self.event_values}, **{c: 0.0 for c in self.censored_values}}
        unit = f" {self.time_unit}" if self.time_unit else ""
        for row, (raw_t, raw_e) in enumerate(zip(frame[self.time].tolist(), frame[self.event].tolist(),
                                                 strict=True), start=1):
            number = _number(raw_t)
            if number is None or number <= 0:
                what = ("missing" if is_missing(raw_t) else "not a number" if number is None
                        else "not above 0")
                problems.append((row, self.time, f"{what}; allowed: a survival time > 0{unit}"))
            else:
                y[row - 1, 0] = number
            event = None if is_missing(raw_e) else codes.get(canonical_label(raw_e))
            if event is None:
                what = "missing" if is_missing(raw_e) else "not a declared event code"
                problems.append((row, self.event, f"{what}; allowed: event_values {list(self.event_values)}, "
                                 f"censored_values {list(self.censored_values)}"))
            else:
                y[row - 1, 1] = event
        return y, problems


TabularTarget = ClassTarget | NumericTarget | SurvivalTarget


def _number(raw: Any) -> float | None:
    if is_missing(raw):
        return None
    try:
        number = float(str(raw).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _codes(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(canonical_label(v) for v in values)


def check_target(table: Any, place: str, problems: list[str]) -> TabularTarget | None:
    """Check a multiclass, regression or survival `[contract].target` (binary is contract.Target's).

    Args:
        table: the target table as loaded.
        place: how refusals name it, e.g. `[contract.target]`.
        problems: where one line per problem is appended.

    Returns:
        The target, or None when it has a problem (or is the binary form, left to the caller).
    """
    task = task_of_target(table)
    before = len(problems)
    if task is None:
        problems.append(f"{place}: matches no target form; allowed: {FORMS}")
        return None
    if task == MULTICLASS:
        values = check_table(table, CLASS_RULES, place, problems, required=("name", "classes"))
        if values is None or len(problems) > before:
            return None
        classes = _codes(values["classes"])
        if len(set(classes)) != len(classes):
            problems.append(f"{place}.classes: {list(classes)} name a class twice (1 and 1.0 are the same "
                            "code)")
            return None
        return ClassTarget(values["name"], classes)
    if task == REGRESSION:
        values = check_table(table, NUMERIC_TARGET_RULES, place, problems,
                             required=("name", "type", "min", "max"))
        if values is None or len(problems) > before:
            return None
        if not values["min"] < values["max"]:
            problems.append(f"{place}.min: min must be below max, got {values['min']:g} >= {values['max']:g}")
            return None
        return NumericTarget(values["name"], values["min"], values["max"], values.get("unit", ""))
    if task == SURVIVAL:
        required = ("time", "event", "event_values", "censored_values", "intervals")
        values = check_table(table, SURVIVAL_RULES, place, problems, required=required)
        if values is None or len(problems) > before:
            return None
        events, censored = _codes(values["event_values"]), _codes(values["censored_values"])
        if set(events) & set(censored):
            problems.append(f"{place}: event_values and censored_values must be disjoint; both hold "
                            f"{sorted(set(events) & set(censored))}")
        intervals = tuple(float(v) for v in values["intervals"])
        if any(b <= a for a, b in itertools.pairwise(intervals)):
            problems.append(f"{place}.intervals: got {list(intervals)}; expected strictly increasing "
                            "interval ends > 0 (interval k covers (intervals[k-1], intervals[k]])")
        horizons = tuple(float(v) for v in values.get("horizons", intervals))
        if intervals and any(h > intervals[-1] for h in horizons):
            problems.append(f"{place}.horizons: got {list(horizons)}; expected times within the grid "
                            f"(0, {intervals[-1]:g}]")
        if values["time"] == values["event"]:
            problems.append(f"{place}: time and event must be two different columns")
        if len(problems) > before:
            return None
        return SurvivalTarget(values["time"], values["event"], events, censored, intervals,
                              tuple(sorted(set(horizons))), values.get("time_unit", ""))
    return None
