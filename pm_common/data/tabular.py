"""Load a site's CSV or Parquet table, validate it against the data contract, and encode it.

Every problem names the file, the data row (1-based, as a spreadsheet shows it below the header)
and the column, so the hospital's data scientist can fix the export without guessing.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pm_common.data.contract import CategoricalFeature, DataContract, NumericFeature, Target

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MAX_LISTED_PROBLEMS = 25


@dataclass(frozen=True)
class Problem:
    row: int | None  # 1-based data row; None for file-level problems
    column: str | None
    message: str

    def describe(self, path: Path) -> str:
        where = str(path)
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"


class DataValidationError(ValueError):
    """A site's table does not satisfy the study's contract; lists every problem found."""

    def __init__(self, path: Path, problems: Sequence[Problem]):
        self.path = path
        self.problems = list(problems)
        lines = [p.describe(path) for p in self.problems[:MAX_LISTED_PROBLEMS]]
        more = len(self.problems) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more problems")
        super().__init__(f"{len(self.problems)} problem(s) in {path}:\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class TabularData:
    """A site's encoded table. Rows stay at the site; only the shape is ever reported."""

    x: np.ndarray  # float32, (n, contract.num_inputs)
    y: np.ndarray  # float32, (n,): 0/1, class index or scaled value; survival (n, 2): time, event
    rows_dropped: int = 0

    def __len__(self) -> int:
        return len(self.y)


def _file_error(path: Path, message: str) -> DataValidationError:
    return DataValidationError(path, [Problem(None, None, message)])


def _decode(path: Path, raw: bytes, encoding: str) -> str:
    try:
        return raw.decode("utf-8-sig" if encoding.lower().replace("-", "") == "utf8" else encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _file_error(
            path,
            f"cannot be read as {encoding}: byte 0x{raw[exc.start]:02x} on line {line}. "
            f"Re-export the file as UTF-8, or set the site's 'encoding' (e.g. 'latin-1').",
        ) from exc


def read_table(path: Path, *, delimiter: str = ",", encoding: str = "utf-8") -> pd.DataFrame:
    """Read a CSV or Parquet file as strings, with clear errors for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise _file_error(path, "file not found")
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise _file_error(path, f"not a readable Parquet file ({exc})") from exc
        text_frame = frame.astype(object).where(frame.notna(), "")
        return text_frame.map(str)
    if suffix not in {".csv", ".tsv", ".txt"}:
        raise _file_error(path, f"unsupported file type {suffix!r}: use .csv or .parquet")
    raw = path.read_bytes()
    if not raw.strip():
        raise _file_error(path, "file is empty")
    text = _decode(path, raw, encoding)
    header = text.splitlines()[0]
    if delimiter not in header:
        try:
            sniffed = csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
        except csv.Error:
            sniffed = None
        if sniffed and sniffed != delimiter:
            raise _file_error(
                path,
                f"wrong delimiter: the header is separated by {sniffed!r}, the study expects "
                f"{delimiter!r}. Re-export with {delimiter!r} or set the site's 'delimiter'.",
            )
    try:
        with warnings.catch_warnings():
            # pandas would otherwise read rows with extra fields by silently shifting columns
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(
                io.StringIO(text),
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                skipinitialspace=True,
                index_col=False,
            )
    except pd.errors.ParserWarning as exc:
        raise _file_error(path, "malformed CSV: some rows have more fields than the header") from exc
    except pd.errors.ParserError as exc:
        raise _file_error(path, f"malformed CSV: {exc}") from exc


def _is_missing(raw: str) -> bool:
    return raw.strip().casefold() in MISSING_TOKENS


def validate_and_encode(frame: pd.DataFrame, contract: DataContract, path: Path) -> TabularData:
    """Check every cell against the contract and encode the rows in one pass."""
    path = Path(path)
    problems: list[Problem] = []
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = columns
    missing_cols = [c for c in contract.expected_columns if c not in columns]
    if missing_cols:
        problems.append(Problem(None, None, f"missing columns {missing_cols}"))
    allowed = set(contract.expected_columns) | set(contract.ignore_columns)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        problems.append(
            Problem(
                None,
                None,
                f"unexpected columns {unknown}: not in the study contract "
                "(list them under contract.ignore_columns if they should be ignored)",
            )
        )
    if problems:
        raise DataValidationError(path, problems)
    if len(frame) == 0:
        raise _file_error(path, "no data rows (only a header)")

    n = len(frame)
    x = np.zeros((n, contract.num_inputs), dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    if not isinstance(contract.target, Target):  # the other tasks' targets (pm_common.data.targets)
        y, target_problems = contract.target.encode(frame)
        problems.extend(Problem(None, None, line) for line in target_problems)
    row_missing = np.zeros(n, dtype=bool)
    indicator_base = sum(f.width for f in contract.features)
    use_indicators = contract.missing_indicators and contract.missing == "impute"

    binary_labels = frame[contract.target.name].tolist() if isinstance(contract.target, Target) else []
    for row, raw_label in enumerate(binary_labels):
        label = None if _is_missing(raw_label) else contract.target.label_of(raw_label)
        if label is None:
            problems.append(
                Problem(
                    row + 1,
                    contract.target.name,
                    f"label {raw_label!r} is not an allowed value: "
                    f"positive {list(contract.target.positive)}, negative {list(contract.target.negative)}",
                )
            )
        else:
            y[row] = label

    offset = 0
    for index, feature in enumerate(contract.features):
        values = frame[feature.name].tolist()
        for row, raw in enumerate(values):
            missing = _is_missing(raw)
            if isinstance(feature, NumericFeature):
                if not missing:
                    try:
                        number = float(raw)
                    except ValueError:
                        problems.append(Problem(row + 1, feature.name, f"{raw!r} is not a number"))
                        continue
                    if number in feature.missing_values:
                        missing = True
                    elif not feature.min <= number <= feature.max:
                        unit = f" {feature.unit}" if feature.unit else ""
                        problems.append(
                            Problem(
                                row + 1,
                                feature.name,
                                f"{raw} is outside the plausible range "
                                f"[{feature.min:g}, {feature.max:g}]{unit}",
                            )
                        )
                        continue
                    else:
                        x[row, offset] = feature.normalise(number)
            elif isinstance(feature, CategoricalFeature):
                if not missing and raw.strip() in feature.missing_values:
                    missing = True
                if not missing:
                    category = feature.index_of(raw)
                    if category is None:
                        problems.append(
                            Problem(
                                row + 1,
                                feature.name,
                                f"unknown category {raw!r}; allowed: {list(feature.values)}",
                            )
                        )
                        continue
                    x[row, offset + category] = 1.0
            if missing:
                if contract.missing == "error":
                    problems.append(
                        Problem(row + 1, feature.name, "missing value (contract.missing = 'error')")
                    )
                row_missing[row] = True
                if use_indicators:
                    x[row, indicator_base + index] = 1.0
        offset += feature.width

    if problems:
        raise DataValidationError(path, problems)
    dropped = 0
    if contract.missing == "drop":
        dropped = int(row_missing.sum())
        x, y = x[~row_missing], y[~row_missing]
    if len(y) < contract.min_rows:
        raise _file_error(
            path, f"only {len(y)} usable rows; the contract needs at least {contract.min_rows}"
        )
    return TabularData(x, y, dropped)


def load_site_table(
    path: Path, contract: DataContract, *, delimiter: str = ",", encoding: str = "utf-8"
) -> TabularData:
    """Read, validate and encode one site's table."""
    return validate_and_encode(
        read_table(path, delimiter=delimiter, encoding=encoding), contract, path
    )


def split_train_test(
    data: TabularData, *, test_fraction: float, seed: int
) -> tuple[TabularData, TabularData]:
    """A fixed, seeded split stratified by label, made at the site from its own rows only."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    indices = np.arange(len(data))
    labels = data.y[:, 1] if data.y.ndim == 2 else data.y  # survival: stratified by event
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(counts) == 2 and counts.min() >= 2 else None
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    train_idx.sort()
    test_idx.sort()
    return (
        TabularData(data.x[train_idx], data.y[train_idx], data.rows_dropped),
        TabularData(data.x[test_idx], data.y[test_idx]),
    )


def load_site_split(
    data: Path, test_data: Path | None, contract: DataContract, *, delimiter: str, encoding: str,
    test_fraction: float, seed: int,
) -> tuple[TabularData, TabularData]:
    """A site's train and test rows: its declared test file when it has one, else a seeded split.

    A site that must honour a fixed split (a published benchmark's, say) declares its test rows in a
    file of their own, validated against the same contract; otherwise its rows are split at the site.

    Args:
        data: the site's (training) table.
        test_data: the site's own test table, or None to split `data`.
        contract: the study's data contract.
        delimiter: the site's CSV delimiter.
        encoding: the site's text encoding.
        test_fraction: share of rows held out when splitting.
        seed: the split's seed.

    Returns:
        (train, test).
    """
    table = load_site_table(data, contract, delimiter=delimiter, encoding=encoding)
    if test_data is None:
        return split_train_test(table, test_fraction=test_fraction, seed=seed)
    return table, load_site_table(test_data, contract, delimiter=delimiter, encoding=encoding)
