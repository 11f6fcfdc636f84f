"""The tabular data contract: what every site's table must look like, declared once per study.

Every site validates its own file against the same contract and encodes it with the same
declared ranges and categories, so preprocessing is identical everywhere without pooling data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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


class ContractError(InputError):
    """The study's data contract itself is malformed; `problems` lists every problem, one line each."""


@dataclass(frozen=True)
class NumericFeature:
    name: str
    min: float
    max: float
    unit: str = ""
    missing_values: tuple[float, ...] = ()  # sentinel codes meaning "not recorded" (e.g. chol = 0)

    @property
    def width(self) -> int:
        return 1

    def normalise(self, value: float) -> float:
        """Map the declared clinical range onto [-1, 1]: the same at every site."""
        mid = (self.max + self.min) / 2.0
        half = (self.max - self.min) / 2.0
        return (value - mid) / half


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    values: tuple[str, ...]
    missing_values: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return len(self.values)

    def index_of(self, raw: str) -> int | None:
        """Case-insensitive lookup: exports differ in 'TRUE' vs 'True' but mean the same."""
        folded = raw.strip().casefold()
        for i, value in enumerate(self.values):
            if value.casefold() == folded:
                return i
        return None


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

    def encoded_names(self) -> list[str]:
        """Names of the encoded columns, in model-input order."""
        names: list[str] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                names.append(f.name)
            else:
                names.extend(f"{f.name}={v}" for v in f.values)
        if self.missing_indicators and self.missing == "impute":
            names.extend(f"{f.name}:missing" for f in self.features)
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
}
TARGET_RULES: dict[str, Rule] = {"name": _NAME, "positive": _LABELS, "negative": _LABELS}
NUMERIC_RULES: dict[str, Rule] = {
    "name": _NAME,
    "type": Choice(("numeric", "categorical")),
    "min": _BOUND,
    "max": _BOUND,
    "unit": Text(max_length=40, min_length=0),
    "missing_values": Items(_BOUND, 0, MAX_SENTINELS),
}
CATEGORICAL_RULES: dict[str, Rule] = {
    "name": _NAME,
    "type": Choice(("numeric", "categorical")),
    "values": Items(_CATEGORY, 2, MAX_CATEGORIES, unique=True),
    "missing_values": Items(_CATEGORY, 0, MAX_SENTINELS),
}


def _labels(value: Any) -> tuple[str, ...]:
    """A label or a list of labels as canonical text ('1.0' and 1 are the same label)."""
    items = value if isinstance(value, tuple) else (value,)
    return tuple(_canonical_number_text(v) for v in items)


def _feature(spec: Any, index: int, problems: list[str]) -> Feature | None:
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
    if len(problems) > before:
        return None
    if kind == "numeric":
        return NumericFeature(name, values["min"], values["max"], values.get("unit", ""),
                              values.get("missing_values", ()))
    return CategoricalFeature(
        name, tuple(str(v) for v in values["values"]), tuple(str(v) for v in values.get("missing_values", ()))
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
    values = check_table(data, CONTRACT_RULES, place, problems, required=("target", "features"))
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
    if "features" in data and (not isinstance(raw_features, list) or not raw_features):
        problems.append(f"[{features_place}]: declare at least one feature (an array of tables), got "
                        f"{show(raw_features)}")
    elif isinstance(raw_features, list):
        if len(raw_features) > MAX_FEATURES:
            problems.append(f"[{features_place}]: {len(raw_features)} features; at most {MAX_FEATURES}")
        for i, spec in enumerate(raw_features[:MAX_FEATURES]):
            feature = _feature(spec, i, problems)
            if feature is not None:
                features.append(feature)
    names = [f.name for f in features]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"[{features_place}]: duplicate names {duplicates}")
    if target is not None and target.get("name") in names:
        problems.append(f"{target_place}.name: the target {target['name']!r} is also declared as a feature")
    for column in other.columns if other is not None else ():
        if column in names:
            problems.append(f"{target_place}: the target column {column!r} is also declared as a feature")
    if len(problems) > before or (target is None and other is None):
        return None
    return DataContract(
        task=form or TASK,
        target=other if other is not None else Target(target["name"], _labels(target["positive"]),
                                                      _labels(target["negative"])),
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
