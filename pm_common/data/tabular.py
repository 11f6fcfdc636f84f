"""Load a site's CSV or Parquet table, validate it against the data contract, and encode it.

Every problem names the file, the data row (1-based, as a spreadsheet shows it below the header)
and the column, so the hospital's data scientist can fix the export without guessing.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pm_common.data.contract import CategoricalFeature, DataContract, NumericFeature, Target

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MAX_LISTED_PROBLEMS = 25
ROWS_SHOWN = 5  # data row numbers a problem line names; the count says how many more
ROW_DEFINITION = "data row N is line N+1 of the file"
NUMBER_HINT = ("some look like numbers written with thousands separators or a decimal comma: set the site's "
               "'thousands' and 'decimal'")


@dataclass(frozen=True)
class NumberFormat:
    """How a site's export writes numbers: `265,000.5` (thousands ",") or `265.000,5` (decimal ",").

    A site setting (`[[sites]]` of a simulated study, `[site]` of a deployed site's site.toml): the same
    contract reads every hospital's export as that hospital wrote it."""

    thousands: str = ""  # "" when numbers carry no grouping
    decimal: str = "."


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one column (or of the whole file), with how many data rows have it.

    Never a cell's value: the message names the rule the cells break (a range, the allowed
    categories), `rows` the first few data rows (1-based, below the header) and `count` all of them."""

    rows: tuple[int, ...]  # the first ROWS_SHOWN data rows with the problem; () for file-level problems
    column: str | None
    message: str
    count: int = 0

    def describe(self, path: Path) -> str:
        """One line: file, column, how many rows, which kind of problem, the first data rows."""
        where = str(path) if self.column is None else f"{path}, column {self.column!r}"
        if not self.rows:
            return f"{where}: {self.message}"
        noun = "row" if self.count == 1 else "rows"
        more = f" and {self.count - len(self.rows)} more" if self.count > len(self.rows) else ""
        shown = ", ".join(str(r) for r in self.rows)
        return f"{where}: {self.count} {noun} {self.message} (data {noun} {shown}{more}; {ROW_DEFINITION})"


def _rows_problem(mask: np.ndarray, column: str, message: str) -> Problem | None:
    """The problem of the rows `mask` marks in `column`, or None when it marks none."""
    count = int(mask.sum())
    if not count:
        return None
    return Problem(tuple(int(r) + 1 for r in np.flatnonzero(mask)[:ROWS_SHOWN]), column, message, count)


def _grouped(cells: Sequence[tuple[int, str, str]], rows: int) -> list[Problem]:
    """Refused cells (data row, column, what is wrong) as one Problem per column and kind."""
    masks: dict[tuple[str, str], np.ndarray] = {}
    for row, column, message in cells:
        masks.setdefault((column, message), np.zeros(rows, dtype=bool))[row - 1] = True
    found = (_rows_problem(mask, column, message) for (column, message), mask in masks.items())
    return [problem for problem in found if problem is not None]


class DataValidationError(ValueError):
    """A site's table does not satisfy the study's contract; lists every problem found, grouped."""

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
    return DataValidationError(path, [Problem((), None, message)])


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


def _missing_mask(cells: pd.Series) -> np.ndarray:
    """Which stripped cells are a missing-value token (only short cells can be one)."""
    mask = np.zeros(len(cells), dtype=bool)
    short = (cells.str.len() <= max(len(t) for t in MISSING_TOKENS)).to_numpy()
    mask[short] = cells[short].str.casefold().isin(MISSING_TOKENS).to_numpy()
    return mask


def parse_numbers(cells: pd.Series, number_format: NumberFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read cells as numbers the way the site's export writes them, all at once.

    Why strict: a thousands separator is accepted only in well-formed groups (`265,000`, not `2,65`),
    and with a decimal comma a `.` that is not the thousands separator is refused, so a column
    exported in another format than the site declared is reported, not misread by a factor of 1,000.

    Args:
        cells: the cells as read (text).
        number_format: the site's thousands separator and decimal mark.

    Returns:
        (values, missing, bad): float64 values (NaN where missing or bad), cells that are a
        missing-value token, and cells that are not numbers in the site's format.
    """
    text = cells.astype(str).str.strip()
    thousands, decimal = number_format.thousands, number_format.decimal
    bad = np.zeros(len(text), dtype=bool)
    if thousands:
        grouped = text.str.contains(thousands, regex=False).to_numpy()
        pattern = rf"[+-]?\d{{1,3}}(?:{re.escape(thousands)}\d{{3}})+(?:{re.escape(decimal)}\d*)?"
        bad |= grouped & ~text.str.fullmatch(pattern).to_numpy(dtype=bool)
        text = text.str.replace(thousands, "", regex=False)
    if decimal != ".":
        bad |= text.str.contains(".", regex=False).to_numpy()
        text = text.str.replace(decimal, ".", regex=False)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    unread = ~np.isfinite(values)  # only these few cells can be a missing-value token: test only them
    missing = np.zeros(len(text), dtype=bool)
    missing[unread] = _missing_mask(text[unread])
    bad |= unread & ~missing
    values[bad | missing] = np.nan
    return values, missing, bad


def _looks_formatted(cells: pd.Series) -> bool:
    """True when a cell looks like `265,000`, `1.234,5` or `3,5`: a format the site may have to declare."""
    return bool(cells.astype(str).str.strip().str.fullmatch(r"[+-]?\d[\d.,' ]*[.,' ]\d+").any())


@dataclass(frozen=True)
class CheckedRows:
    """Every row of a table checked against the contract and encoded, the refused ones marked.

    `x` and `y` hold every row (a refused row's encoding is meaningless); `problems` are grouped per
    column and kind as DataValidationError lists them, file-level ones (no rows) included."""

    x: np.ndarray
    y: np.ndarray
    problems: list[Problem]
    refused: np.ndarray  # bool per row: one of its cells breaks the contract
    dropped: np.ndarray  # bool per row: a cell missing in a column whose policy is "drop"


def check_rows(
    frame: pd.DataFrame, contract: DataContract, number_format: NumberFormat = NumberFormat(), *,
    outcome: bool = True,
) -> CheckedRows:
    """Check every cell of every column against the contract and encode every row; raise nothing.

    Args:
        frame: the table as text (read_table).
        contract: the study's data contract.
        number_format: how the site writes numbers.
        outcome: False for new patients' rows: the outcome columns are then neither required nor
            checked (nor encoded: `y` is 0).

    Returns:
        The encoded rows, the problems and which rows they refuse.
    """
    problems: list[Problem] = []
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = columns
    present = set(columns)
    expected = contract.expected_columns if outcome else contract.feature_names
    missing_cols = [c for c in expected if c not in present]
    if missing_cols:
        problems.append(Problem((), None, f"{len(missing_cols)} missing column(s) {_some(missing_cols)}"))
    allowed = set(contract.expected_columns) | set(contract.ignore_columns)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        problems.append(Problem((), None, f"{len(unknown)} unexpected column(s) {_some(unknown)}: not in the "
                                "study contract (list them under contract.ignore_columns if they should be "
                                "ignored)"))
    n = len(frame)
    refused = np.zeros(n, dtype=bool)
    if n == 0:
        problems.append(Problem((), None, "no data rows (only a header)"))
        empty = np.zeros((0, contract.num_inputs), dtype=np.float32)
        return CheckedRows(empty, np.zeros(0, dtype=np.float32), problems, refused, refused.copy())

    def refuse(mask: np.ndarray, column: str, message: str) -> None:
        found = _rows_problem(mask, column, message)
        if found is not None:
            refused[:] |= mask
            problems.append(found)

    x = np.zeros((n, contract.num_inputs), dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    target = contract.target
    if outcome and not isinstance(target, Target) and present.issuperset(target.columns):
        for name in target.numeric_columns:  # in the site's own number format, as features are read:
            read, _, unread = parse_numbers(frame[name], number_format)  # "1.234" with thousands "."
            frame[name] = np.where(unread | np.isnan(read), frame[name], read.astype(str))  # is 1234
        y, bad_cells = target.encode(frame)  # the other tasks' targets (pm_common.data.targets)
        problems.extend(_grouped(bad_cells, n))
        for row, _, _ in bad_cells:
            refused[row - 1] = True
    row_missing = np.zeros(n, dtype=bool)
    indicators = contract.indicator_positions()

    if outcome and isinstance(target, Target) and target.name in present:
        bad_label = np.zeros(n, dtype=bool)
        for row, raw_label in enumerate(frame[target.name].tolist()):
            label = None if _is_missing(raw_label) else target.label_of(raw_label)
            if label is None:
                bad_label[row] = True
            else:
                y[row] = label
        refuse(bad_label, target.name, f"with a label that is not allowed; allowed: positive "
               f"{list(target.positive)}, negative {list(target.negative)}")

    offsets = np.cumsum([0] + [f.width for f in contract.features])
    numeric = [i for i, f in enumerate(contract.features)
               if isinstance(f, NumericFeature) and f.name in present]
    if numeric:
        block = frame[[contract.features[i].name for i in numeric]].to_numpy(dtype=object)
        values, missing, bad = parse_numbers(pd.Series(block.ravel(order="F")), number_format)
        shape = (n, len(numeric))
        values, missing, bad = (a.reshape(shape, order="F") for a in (values, missing, bad))
        for j, index in enumerate(numeric):
            feature = contract.features[index]
            assert isinstance(feature, NumericFeature)
            column = values[:, j]
            if feature.missing_values:
                sentinel = np.isin(column, feature.missing_values)
                missing[:, j] |= sentinel
                column = np.where(sentinel, np.nan, column)
            hint = f"; {NUMBER_HINT}" if bad[:, j].any() and _looks_formatted(
                pd.Series(block[bad[:, j], j])) else ""
            unit = f" {feature.unit}" if feature.unit else ""
            outside = ~np.isnan(column) & ((column < feature.min) | (column > feature.max))
            refuse(bad[:, j], feature.name, f"not a number{hint}")
            refuse(outside, feature.name,
                   f"outside the plausible range [{feature.min:g}, {feature.max:g}]{unit}")
            usable = ~np.isnan(column) & ~outside
            with np.errstate(invalid="ignore"):
                x[usable, offsets[index]] = feature.normalise(column[usable])
            _missing_cells(missing[:, j], index, contract, x, row_missing, indicators, refuse)

    for index, feature in enumerate(contract.features):
        if not isinstance(feature, CategoricalFeature) or feature.name not in present:
            continue
        cells = frame[feature.name].astype(str).str.strip().to_numpy(dtype=object)
        uniques, inverse = np.unique(cells, return_inverse=True)
        category = np.full(len(uniques), -1)
        missing_kind = np.zeros(len(uniques), dtype=bool)
        for u, raw in enumerate(uniques):
            if _is_missing(raw) or feature.is_missing_code(raw, number_format.decimal):
                missing_kind[u] = True
            else:
                found_index = feature.index_of(raw, number_format.decimal)
                category[u] = -1 if found_index is None else found_index
        codes, missing = category[inverse], missing_kind[inverse]
        refuse(~missing & (codes < 0), feature.name,
               f"with an unknown category; allowed: {list(feature.values)}")
        known = np.flatnonzero(codes >= 0)
        x[known, offsets[index] + codes[known]] = 1.0
        _missing_cells(missing, index, contract, x, row_missing, indicators, refuse)
    return CheckedRows(x, y, problems, refused, row_missing)


def validate_and_encode(
    frame: pd.DataFrame, contract: DataContract, path: Path, number_format: NumberFormat = NumberFormat()
) -> TabularData:
    """Check every cell of every column against the contract, then encode the rows.

    Every column of the file is checked before anything stops, and problems are reported grouped
    per column and kind, with counts and the first data rows, never with a cell's value.

    Args:
        frame: the site's table as text (read_table).
        contract: the study's data contract.
        path: the file, as messages name it.
        number_format: how the site writes numbers.

    Returns:
        The encoded rows (rows with a missing cell dropped for columns whose policy is "drop").

    Raises:
        DataValidationError: one Problem per file-level problem and per (column, kind of problem).
    """
    path = Path(path)
    checked = check_rows(frame, contract, number_format)
    if checked.problems:
        raise DataValidationError(path, checked.problems)
    x, y = checked.x, checked.y
    dropped = int(checked.dropped.sum())
    if dropped:
        x, y = x[~checked.dropped], y[~checked.dropped]
    if len(y) < contract.min_rows:
        raise _file_error(
            path, f"only {len(y)} usable rows; the contract needs at least {contract.min_rows}"
        )
    return TabularData(x, y, dropped)


def _missing_cells(
    missing: np.ndarray,
    index: int,
    contract: DataContract,
    x: np.ndarray,
    row_missing: np.ndarray,
    indicators: dict[int, int],
    refuse: Callable[[np.ndarray, str, str], None],
) -> None:
    """Apply a feature's missing policy to its missing cells: refuse them, drop their rows, or impute
    (0, the middle of the range or no category) and switch on the feature's indicator input."""
    feature = contract.features[index]
    if feature.missing == "error":
        refuse(missing, feature.name, "missing (the column's missing policy is 'error')")
    elif feature.missing == "drop":
        row_missing |= missing
    elif index in indicators:
        x[missing, indicators[index]] = 1.0


def _some(names: Sequence[str], shown: int = 10) -> str:
    """A list of column names, the first `shown` of them, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{list(names[:shown])}{more}"


def load_site_table(
    path: Path,
    contract: DataContract,
    *,
    delimiter: str = ",",
    encoding: str = "utf-8",
    number_format: NumberFormat = NumberFormat(),
) -> TabularData:
    """Read, validate and encode one site's table.

    Args:
        path: the site's CSV or Parquet file.
        contract: the study's data contract.
        delimiter: the site's CSV delimiter.
        encoding: the site's text encoding.
        number_format: how the site writes numbers.

    Returns:
        The encoded rows.
    """
    frame = read_table(path, delimiter=delimiter, encoding=encoding)
    return validate_and_encode(frame, contract, path, number_format)


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
    test_fraction: float, seed: int, number_format: NumberFormat = NumberFormat(),
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
        number_format: how the site writes numbers (both files).

    Returns:
        (train, test).
    """
    table = load_site_table(data, contract, delimiter=delimiter, encoding=encoding,
                            number_format=number_format)
    if test_data is None:
        return split_train_test(table, test_fraction=test_fraction, seed=seed)
    return table, load_site_table(test_data, contract, delimiter=delimiter, encoding=encoding,
                                  number_format=number_format)
