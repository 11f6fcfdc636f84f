"""The tabular data contract: what every site's table must look like, declared once per study.

Every site validates its own file against the same contract and encodes it with the same
declared ranges and categories, so preprocessing is identical everywhere without pooling data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MissingPolicy = Literal["impute", "drop", "error"]
MISSING_POLICIES: tuple[str, ...] = ("impute", "drop", "error")


class ContractError(ValueError):
    """The study's data contract itself is malformed."""


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
    target: Target
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
        return [*self.feature_names, self.target.name]

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


def _canonical_number_text(raw: str) -> str:
    """'1.0' and '1' are the same label; keep non-numbers as written."""
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _as_str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, (str, int, float)):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ContractError(f"{where}: expected a list, got {value!r}")
    return tuple(_canonical_number_text(v) for v in value)


def _feature_from_dict(spec: Mapping[str, Any], index: int) -> Feature:
    where = f"contract.features[{index}]"
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ContractError(f"{where}: every feature needs a 'name'")
    kind = spec.get("type")
    if kind == "numeric":
        try:
            low, high = float(spec["min"]), float(spec["max"])
        except KeyError as exc:
            raise ContractError(f"{where} ({name}): numeric features need 'min' and 'max'") from exc
        if not low < high:
            raise ContractError(f"{where} ({name}): min must be below max, got {low} >= {high}")
        sentinels = tuple(float(v) for v in spec.get("missing_values", ()))
        return NumericFeature(name, low, high, str(spec.get("unit", "")), sentinels)
    if kind == "categorical":
        values = tuple(str(v) for v in spec.get("values", ()))
        if len(values) < 2:
            raise ContractError(f"{where} ({name}): categorical features need 2+ 'values'")
        if len({v.casefold() for v in values}) != len(values):
            raise ContractError(f"{where} ({name}): duplicate categories in {list(values)}")
        return CategoricalFeature(
            name, values, tuple(str(v) for v in spec.get("missing_values", ()))
        )
    raise ContractError(f"{where} ({name}): type must be 'numeric' or 'categorical', got {kind!r}")


def contract_from_dict(data: Mapping[str, Any]) -> DataContract:
    """Build a contract from the `[contract]` table of a study TOML."""
    task = data.get("task", "binary-classification")
    if task != "binary-classification":
        raise ContractError(
            f"contract.task: only 'binary-classification' is supported, got {task!r}"
        )
    target = data.get("target")
    if not isinstance(target, Mapping) or "name" not in target:
        raise ContractError("contract.target: needs a table with 'name', 'positive' and 'negative'")
    positive = _as_str_tuple(target.get("positive", ()), "contract.target.positive")
    negative = _as_str_tuple(target.get("negative", ()), "contract.target.negative")
    if not positive or not negative or set(positive) & set(negative):
        raise ContractError(
            "contract.target: 'positive' and 'negative' must be non-empty and disjoint"
        )
    raw_features = data.get("features", ())
    if not raw_features:
        raise ContractError("contract.features: declare at least one feature")
    features = tuple(_feature_from_dict(f, i) for i, f in enumerate(raw_features))
    names = [f.name for f in features]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ContractError(f"contract.features: duplicate names {duplicates}")
    if target["name"] in names:
        raise ContractError(
            f"contract: the target {target['name']!r} is also declared as a feature"
        )
    missing = data.get("missing", "impute")
    if missing not in MISSING_POLICIES:
        raise ContractError(f"contract.missing: must be one of {MISSING_POLICIES}, got {missing!r}")
    return DataContract(
        task=task,
        target=Target(str(target["name"]), positive, negative),
        features=features,
        missing=missing,
        missing_indicators=bool(data.get("missing_indicators", True)),
        ignore_columns=tuple(str(c) for c in data.get("ignore_columns", ())),
        min_rows=int(data.get("min_rows", 1)),
    )
