"""The tabular data contract: what every site's table must look like, declared once per study.

Every site validates its own file against the same contract and encodes it with the same
declared ranges and categories, so preprocessing is identical everywhere without pooling data.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pm_common.data.targets import (
    BINARY,
    TABULAR_TASKS,
    TabularTarget,
    check_target,
    task_of_target,
)
from pm_common.data.targets import canonical_label as _canonical_number_text
from pm_common.study.schema import (
    AnyOf,
    Boolean,
    Choice,
    InputError,
    Integer,
    Items,
    Nested,
    Number,
    Rule,
    Text,
    check_table,
    quote_name,
    show,
)

MissingPolicy = Literal["impute", "drop", "error"]
MISSING_POLICIES: tuple[str, ...] = ("impute", "drop", "error")
Transform = Literal["none", "log1p"]
TRANSFORMS: tuple[str, ...] = ("none", "log1p")


class ContractError(InputError):
    """The study's data contract itself is malformed; `problems` lists every problem, one line each."""


@dataclass(frozen=True)
class NumericFeature:
    name: str
    min: float
    max: float
    unit: str = ""
    missing_values: tuple[float, ...] = ()  # sentinel codes meaning "not recorded" (e.g. chol = 0)
    transform: Transform = "none"  # "log1p": counts and expression levels spanning orders of magnitude
    missing: MissingPolicy = "impute"  # what a missing cell means for this column (the contract's by default)

    @property
    def width(self) -> int:
        return 1

    def _scaled(self, value: Any) -> Any:
        return np.log1p(value) if self.transform == "log1p" else value

    def normalise(self, value: Any) -> Any:
        """Map the declared clinical range (after the transform) onto [-1, 1]: the same at every site.

        Args:
            value: a value in the declared range, or an array of them.

        Returns:
            The encoded value(s).
        """
        low, high = self._scaled(self.min), self._scaled(self.max)
        return (self._scaled(value) - (high + low) / 2.0) / ((high - low) / 2.0)

    @property
    def neutral(self) -> float:
        """The raw value that encodes to exactly 0 (the middle of the range after the transform)."""
        middle = (self._scaled(self.min) + self._scaled(self.max)) / 2.0
        return math.expm1(middle) if self.transform == "log1p" else middle


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    values: tuple[str, ...]
    missing_values: tuple[str, ...] = ()
    missing: MissingPolicy = "impute"

    @property
    def width(self) -> int:
        return len(self.values)

    def index_of(self, raw: str, decimal: str = ".") -> int | None:
        """The category a cell names, whatever its spelling.

        Exports differ in 'TRUE' vs 'True' and in how they write numeric codes ('1', '1.0', '1.00',
        '1,0' with a decimal comma): all mean the same category, so both sides are compared in the
        canonical spelling of `category_key`.

        Args:
            raw: the cell as read.
            decimal: the site's decimal mark.

        Returns:
            The category's position in `values`, or None when the cell names none of them.
        """
        key = category_key(raw, decimal)
        for i, value in enumerate(self.values):
            if category_key(value) == key:
                return i
        return None

    def is_missing_code(self, raw: str, decimal: str = ".") -> bool:
        """True when the cell is one of the declared missing codes, in any spelling."""
        key = category_key(raw, decimal)
        return any(category_key(code) == key for code in self.missing_values)


def category_key(raw: str, decimal: str = ".") -> str:
    """A category code's canonical spelling: case folded, and numbers written one way.

    Args:
        raw: a cell or a declared category.
        decimal: the decimal mark the cell was written with ("," in many European exports).

    Returns:
        e.g. '1' for '1', '1.0', '1.00' and (decimal ",") '1,0'; '0.5' for '0.50'; 'male' for 'Male'.
    """
    text = str(raw).strip()
    number_text = text.replace(decimal, ".") if decimal != "." and text.count(decimal) == 1 else text
    try:
        number = float(number_text)
    except ValueError:
        return text.casefold()
    if not math.isfinite(number) or "_" in number_text:
        return text.casefold()
    return str(int(number)) if number.is_integer() else repr(number)


Feature = NumericFeature | CategoricalFeature


@dataclass(frozen=True)
class Target:
    """Binary target: which raw values are positive and which negative. Anything else is an error."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    task = BINARY

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.name,)

    def label_of(self, raw: str) -> int | None:
        text = _canonical_number_text(raw)
        if text in self.positive:
            return 1
        if text in self.negative:
            return 0
        return None


@dataclass(frozen=True)
class DataContract:
    task: str
    target: Target | TabularTarget
    features: tuple[Feature, ...]
    missing: MissingPolicy = "impute"
    missing_indicators: bool = True
    ignore_columns: tuple[str, ...] = ()
    min_rows: int = 1

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def expected_columns(self) -> list[str]:
        return [*self.feature_names, *self.target.columns]

    def indicator_positions(self) -> dict[int, int]:
        """Which features get a missing-value indicator input, and where it sits.

        Only a feature whose missing cells are imputed can be missing in an encoded row (`error`
        refuses the file, `drop` drops the row), so only those get an indicator: 5,000 always
        measured genes (`missing = "error"`) add no 5,000 inputs that are always 0.

        Returns:
            feature index -> the indicator's model-input index; empty without indicators.
        """
        if not self.missing_indicators:
            return {}
        base = sum(f.width for f in self.features)
        imputed = [i for i, f in enumerate(self.features) if f.missing == "impute"]
        return {index: base + k for k, index in enumerate(imputed)}

    def encoded_names(self) -> list[str]:
        """Names of the encoded columns, in model-input order."""
        names: list[str] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                names.append(f.name)
            else:
                names.extend(f"{f.name}={v}" for v in f.values)
        names.extend(f"{self.features[i].name}:missing" for i in self.indicator_positions())
        return names

    @property
    def num_inputs(self) -> int:
        return len(self.encoded_names())


TASK = BINARY
MAX_FEATURES = 1000  # columns a contract declares; each is one or more model inputs
MAX_CATEGORIES = 1000  # values of one categorical feature (one model input each)
MAX_LABELS = 1000  # raw values listed as positive or negative
MAX_SENTINELS = 100  # missing-value codes of one feature
MAX_ABS_BOUND = 1e15  # |min|, |max| of a numeric feature: max - min stays a finite float
MAX_MIN_ROWS = 10_000_000

_NAME = Text(max_length=200, what="a column name")
_LABEL = AnyOf((Text(max_length=200), Integer(-(2**63), 2**63 - 1), Number(-MAX_ABS_BOUND, MAX_ABS_BOUND)),
               "text, an integer or a finite number")
_LABELS = AnyOf((_LABEL, Items(_LABEL, 1, MAX_LABELS)), f"a label or an array of 1 to {MAX_LABELS} labels "
                "(text or numbers)")
_CATEGORY = AnyOf((Text(max_length=200), Integer(-(2**63), 2**63 - 1)), "text or an integer")
_BOUND = Number(-MAX_ABS_BOUND, MAX_ABS_BOUND)
CONTRACT_RULES: dict[str, Rule] = {
    "task": Choice(TABULAR_TASKS),
    "missing": Choice(MISSING_POLICIES),
    "missing_indicators": Boolean(),
    "ignore_columns": Items(_NAME, 0, MAX_FEATURES),
    "min_rows": Integer(1, MAX_MIN_ROWS),
    "target": Nested("a table { name, positive, negative } or another task's target form"),
    "features": Nested("an array of feature tables"),
    "feature_groups": Nested("an array of feature-group tables"),
}
TARGET_RULES: dict[str, Rule] = {"name": _NAME, "positive": _LABELS, "negative": _LABELS}
NUMERIC_RULES: dict[str, Rule] = {
    "name": _NAME,
    "type": Choice(("numeric", "categorical")),
    "min": _BOUND,
    "max": _BOUND,
    "unit": Text(max_length=40, min_length=0),
    "missing_values": Items(_BOUND, 0, MAX_SENTINELS),
    "transform": Choice(TRANSFORMS),
    "missing": Choice(MISSING_POLICIES),
}
CATEGORICAL_RULES: dict[str, Rule] = {
    "name": _NAME,
    "type": Choice(("numeric", "categorical")),
    "values": Items(_CATEGORY, 2, MAX_CATEGORIES, unique=True),
    "missing_values": Items(_CATEGORY, 0, MAX_SENTINELS),
    "missing": Choice(MISSING_POLICIES),
}
MAX_GROUP_COLUMNS = 50_000  # columns all feature groups of a contract declare (omics panels: thousands)
MAX_RANGE_END = 10**9
GROUP_RULES: dict[str, Rule] = {
    "name": Text(max_length=64, what="a group label"),
    "columns": Items(_NAME, 1, MAX_GROUP_COLUMNS, unique=True),
    "prefix": _NAME,
    "range": Items(Integer(0, MAX_RANGE_END), 2, 2),
    "digits": Integer(1, 12),
    "glob": Text(max_length=200, what="a glob pattern"),
    "count": Integer(1, MAX_GROUP_COLUMNS),
    **{k: v for k, v in NUMERIC_RULES.items() if k not in ("name", "type")},
    "type": Choice(("numeric",)),
}
GLOB_REFUSAL = ("a glob alone cannot name the model's inputs: the coordinator builds the model from the "
                "study before any site's data is read, and two sites whose headers match the glob with "
                "different columns would feed different genes into the same input. List the columns "
                "(`columns = [...]`, which `pmfl contract draft` writes from a file) or name them by "
                "`prefix` and `range`; beside either, `glob` checks that every listed column matches it")


def _labels(value: Any) -> tuple[str, ...]:
    """A label or a list of labels as canonical text ('1.0' and 1 are the same label)."""
    items = value if isinstance(value, tuple) else (value,)
    return tuple(_canonical_number_text(v) for v in items)


def _group_columns(values: Mapping[str, Any], place: str, problems: list[str]) -> list[str]:
    """The column names a feature group declares: its `columns`, or `prefix` + `range` (+ `digits`)."""
    listed, ranged = "columns" in values, "prefix" in values or "range" in values
    if listed == ranged:
        problems.append(f"{place}: name the columns either by `columns = [...]` or by `prefix` and `range` "
                        "(e.g. prefix = \"GENE_\", range = [1, 5000]), not both"
                        + ("" if listed else f"; {GLOB_REFUSAL}" if "glob" in values else ""))
        return []
    if listed:
        names = list(values["columns"])
    elif not {"prefix", "range"} <= set(values):
        problems.append(f"{place}: `prefix` and `range` go together "
                        "(e.g. prefix = \"GENE_\", range = [1, 5000])")
        return []
    else:
        first, last = values["range"]
        if not first <= last or last - first + 1 > MAX_GROUP_COLUMNS:
            problems.append(f"{place}.range: got [{first}, {last}]; expected [first, last] with first <= "
                            f"last and at most {MAX_GROUP_COLUMNS} columns")
            return []
        digits = values.get("digits", 1)
        names = [f"{values['prefix']}{number:0{digits}d}" for number in range(first, last + 1)]
    if "digits" in values and listed:
        problems.append(f"{place}.digits: applies to `prefix` and `range` only")
    if "glob" in values:
        unmatched = [name for name in names if not fnmatch.fnmatchcase(name, values["glob"])]
        if unmatched:
            problems.append(f"{place}.glob: {len(unmatched)} listed column(s) do not match "
                            f"{values['glob']!r}, e.g. {unmatched[:3]}")
    if "count" in values and values["count"] != len(names):
        problems.append(f"{place}.count: {values['count']} declared, {len(names)} columns named")
    return names


def _feature_group(spec: Any, index: int, default_missing: str, problems: list[str]) -> list[Feature]:
    """One `[[contract.feature_groups]]` entry as the numeric features it stands for, in its order.

    Why names and not only a glob: see GLOB_REFUSAL.
    """
    label = spec.get("name") if isinstance(spec, Mapping) else None
    named = isinstance(label, str) and label.isprintable() and 0 < len(label) <= 64
    place = f"[[contract.feature_groups]] {quote_name(label) if named else f'#{index + 1}'}"
    before = len(problems)
    values = check_table(spec, GROUP_RULES, place, problems, required=("type", "min", "max"))
    if values is None:
        return []
    if {"min", "max"} <= set(values) and not values["min"] < values["max"]:
        problems.append(f"{place}.min: min must be below max, got {values['min']:g} >= {values['max']:g}")
    _check_transform(values, place, problems)
    if "glob" in values and "columns" not in values and "prefix" not in values and "range" not in values:
        problems.append(f"{place}.glob: {GLOB_REFUSAL}")
        return []
    names = _group_columns(values, place, problems)
    if len(problems) > before:
        return []
    return [NumericFeature(name, values["min"], values["max"], values.get("unit", ""),
                           values.get("missing_values", ()), values.get("transform", "none"),
                           values.get("missing", default_missing)) for name in names]


def _check_transform(values: Mapping[str, Any], place: str, problems: list[str]) -> None:
    """log1p needs every value of the declared range above -1."""
    if values.get("transform") == "log1p" and "min" in values and values["min"] <= -1:
        problems.append(f"{place}.min: got {values['min']:g}; transform = \"log1p\" needs min > -1")


def _feature(spec: Any, index: int, problems: list[str], default_missing: str = "impute") -> Feature | None:
    name = spec.get("name") if isinstance(spec, Mapping) else None
    named = isinstance(name, str) and name.isprintable() and 0 < len(name) <= 200
    place = f"[[contract.features]] {quote_name(name) if named else f'#{index + 1}'}"
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    rules = CATEGORICAL_RULES if kind == "categorical" else NUMERIC_RULES
    required = ("name", "type", "values") if kind == "categorical" else ("name", "type", "min", "max")
    before = len(problems)
    values = check_table(spec, rules, place, problems, required=required)
    if values is None:
        return None
    if kind == "numeric" and {"min", "max"} <= set(values) and not values["min"] < values["max"]:
        problems.append(f"{place}.min: min must be below max, got {values['min']:g} >= {values['max']:g}")
    if kind == "numeric":
        _check_transform(values, place, problems)
    if kind == "categorical":
        keys = [category_key(str(v)) for v in values.get("values", ())]
        same = sorted({str(v) for v, k in zip(values.get("values", ()), keys, strict=True)
                       if keys.count(k) > 1})
        if same:
            problems.append(f"{place}.values: {same} are spellings of the same category (codes match "
                            "whatever their spelling: 1 = 1.0, 'Male' = 'male')")
    if len(problems) > before or not isinstance(name, str):
        return None
    missing = values.get("missing", default_missing)
    if kind == "numeric":
        return NumericFeature(name, values["min"], values["max"], values.get("unit", ""),
                              values.get("missing_values", ()), values.get("transform", "none"), missing)
    return CategoricalFeature(
        name,
        tuple(str(v) for v in values["values"]),
        tuple(str(v) for v in values.get("missing_values", ())),
        missing,
    )


def check_contract(data: Any, problems: list[str], place: str = "[contract]") -> DataContract | None:
    """Check a `[contract]` table, its target and every feature.

    Args:
        data: the table as loaded.
        problems: where one line per problem is appended.
        place: how refusals name the table.

    Returns:
        The contract, or None when it has any problem.
    """
    before = len(problems)
    grouped = isinstance(data, Mapping) and "feature_groups" in data  # groups alone declare features too
    values = check_table(data, CONTRACT_RULES, place, problems,
                         required=("target",) if grouped else ("target", "features"))
    if values is None:
        return None
    target_place = f"{place.rstrip(']')}.target]"
    form = task_of_target(data.get("target")) if "target" in data else BINARY
    declared = values.get("task")
    if declared is not None and form is not None and declared != form:
        problems.append(f"{place.rstrip(']')}].task: {declared!r} does not match the target's form, which "
                        f"declares {form!r}; omit task or write the target as {form!r} expects")
    other: TabularTarget | None = None
    if form != BINARY:
        other = check_target(data.get("target"), target_place, problems)
        target = None
    else:
        target = check_table(data.get("target"), TARGET_RULES, target_place, problems,
                             required=("name", "positive", "negative")) if "target" in data else None
    if target is not None and {"positive", "negative"} <= set(target):
        positive, negative = _labels(target["positive"]), _labels(target["negative"])
        if set(positive) & set(negative):
            problems.append(f"{target_place}: 'positive' and 'negative' must be non-empty and disjoint; both "
                            f"hold {sorted(set(positive) & set(negative))}")
    raw_features = data.get("features")
    features: list[Feature] = []
    features_place = f"[{place.strip('[]')}.features]"
    if "features" in data and (not isinstance(raw_features, list) or not (raw_features or grouped)):
        problems.append(f"[{features_place}]: declare at least one feature (an array of tables), got "
                        f"{show(raw_features)}")
    elif isinstance(raw_features, list):
        if len(raw_features) > MAX_FEATURES:
            problems.append(f"[{features_place}]: {len(raw_features)} features; at most {MAX_FEATURES}")
        for i, spec in enumerate(raw_features[:MAX_FEATURES]):
            feature = _feature(spec, i, problems, values.get("missing", "impute"))
            if feature is not None:
                features.append(feature)
    groups = data.get("feature_groups", [])
    groups_place = f"[[{place.strip('[]')}.feature_groups]]"
    if not isinstance(groups, list) or (grouped and not groups):
        problems.append(f"{groups_place}: got {show(groups)}; expected an array of tables")
        groups = []
    grouped_columns = 0
    for i, spec in enumerate(groups):
        members = _feature_group(spec, i, values.get("missing", "impute"), problems)
        grouped_columns += len(members)
        if grouped_columns > MAX_GROUP_COLUMNS:  # stop before a hostile study expands without bound
            problems.append(f"{groups_place}: more than {MAX_GROUP_COLUMNS} columns in all")
            break
        features.extend(members)
    names = [f.name for f in features]
    counts = Counter(names)
    duplicates = sorted(n for n, k in counts.items() if k > 1)
    if duplicates:
        problems.append(f"[{features_place}]: duplicate names {duplicates[:10]}"
                        + (f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else "")
                        + " (across features and feature groups)")
    if target is not None and target.get("name") in counts:
        problems.append(f"{target_place}.name: the target {target['name']!r} is also declared as a feature")
    for column in other.columns if other is not None else ():
        if column in names:
            problems.append(f"{target_place}: the target column {column!r} is also declared as a feature")
    if len(problems) > before or (target is None and other is None):
        return None
    if other is None:
        assert target is not None  # checked just above
        other_or_binary: Target | TabularTarget = Target(target["name"], _labels(target["positive"]),
                                                          _labels(target["negative"]))
    else:
        other_or_binary = other
    return DataContract(
        task=form or TASK,
        target=other_or_binary,
        features=tuple(features),
        missing=values.get("missing", "impute"),
        missing_indicators=values.get("missing_indicators", True),
        ignore_columns=values.get("ignore_columns", ()),
        min_rows=values.get("min_rows", 1),
    )


def contract_from_dict(data: Mapping[str, Any]) -> DataContract:
    """Build a contract from the `[contract]` table of a study TOML.

    Raises:
        ContractError: listing every problem of the table, one line each.
    """
    problems: list[str] = []
    contract = check_contract(data, problems)
    if contract is None:
        raise ContractError(problems)
    return contract
