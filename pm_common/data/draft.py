"""Draft a complete, runnable study from a hospital's own export files (`pmfl contract draft`).

Why: writing a data contract by hand for a table of a hundred columns (or of five thousand genes)
takes hours and invites typos; reading the export does most of it. A hospital runs the draft on its
own files, at the site: only the draft leaves, and the draft says in comments which of its lines
were read from the data (categories, rounded ranges) and must be reviewed before the study is
shared with other sites, because they reveal something about this site's patients. Identifier- and
date-like columns are left out (`ignore_columns`) with a comment saying why, and never quoted.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from pm_common.data.contract import category_key
from pm_common.data.tabular import NumberFormat, parse_numbers, read_table
from pm_common.study.config import DELIMITERS
from pm_common.study.schema import NAME_PATTERN, InputError

TASKS = ("binary-classification", "multiclass-classification", "regression", "survival")
MAX_CATEGORIES = 30  # distinct text values a categorical column may have; more: free text, left out
MAX_CLASSES = 10  # distinct target values read as classes (more, and numeric: regression)
GROUP_MIN_COLUMNS = 21  # numeric columns sharing a prefix that become one feature group (> 20)
FORMATS = (NumberFormat(), NumberFormat("", ","), NumberFormat(","), NumberFormat(".", ","))  # ties: plainest
ENCODINGS = ("utf-8", "cp1252")
DATE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}([ T].*)?|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{4}/\d{1,2}/\d{1,2}")
ID_NAME = re.compile(r"(^|_)(id|mrn|patient|record|key|uuid|no|number|nr)($|_)", re.IGNORECASE)
PREFIX = re.compile(r"^(?P<prefix>.+[_.-])[^_.-]+$|^(?P<stem>.*?[A-Za-z])\d+$")
SAME_SHAPE = 100.0  # a group's columns have maxima within this factor of each other (one shared range)
REVIEW = "read from this site's data: review before the study is shared with other sites"


class DraftError(InputError):
    """The files cannot be drafted into a study (unreadable, no such target column, ...)."""


@dataclass(frozen=True)
class SiteFile:
    """One site's export as the draft read it."""

    name: str
    path: Path
    frame: pd.DataFrame
    delimiter: str
    encoding: str
    number_format: NumberFormat
    numbers: np.ndarray  # (rows, columns): every cell read once in the site's number format; NaN: none
    missing: np.ndarray
    bad: np.ndarray

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A column's numbers, missing cells and non-number cells."""
        j = self.frame.columns.get_loc(name)
        return self.numbers[:, j], self.missing[:, j], self.bad[:, j]


@dataclass
class Column:
    """What the draft decided for one column, and why (the comment it writes)."""

    name: str
    kind: str  # "numeric", "categorical", "ignore"
    why: str = ""
    low: float = 0.0
    high: float = 0.0
    integer: bool = False
    values: list[str] = field(default_factory=list)
    can_be_missing: bool = False
    skewed: bool = False


def _site_name(path: Path, taken: set[str]) -> str:
    """The file's name as a site name (letters, digits, `.`, `_`, `-`), unique among the draft's sites."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "site"
    base = base if NAME_PATTERN.match(base) else f"site-{base}"
    name, k = base[:64], 2
    while name in taken:
        name, k = f"{base[:60]}-{k}", k + 1
    taken.add(name)
    return name


def _sniff(path: Path) -> tuple[str, str]:
    """The file's delimiter and encoding, read from its header."""
    raw = path.read_bytes()[:65536]
    for encoding in ENCODINGS:
        try:
            header = raw.decode(encoding).lstrip("\ufeff").splitlines()[0] if raw.strip() else ""
            break
        except UnicodeDecodeError:
            continue
    else:  # pragma: no cover - cp1252 decodes almost anything
        encoding, header = "latin-1", raw.decode("latin-1").splitlines()[0]
    counts = {d: header.count(d) for d in DELIMITERS}
    return (max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","), encoding


def _number_format(frame: pd.DataFrame) -> NumberFormat:
    """The format under which most numeric-looking cells of the file read as numbers."""
    cells = pd.Series(frame.to_numpy(dtype=object).ravel())
    cells = cells[cells.astype(str).str.contains(r"\d", regex=True)]
    if cells.empty:
        return NumberFormat()
    sample = cells.sample(min(len(cells), 20000), random_state=0) if len(cells) > 20000 else cells
    scores = [int((~parse_numbers(sample, f)[2]).sum()) for f in FORMATS]
    return FORMATS[int(np.argmax(scores))]  # ties keep the plainest format (first)


def read_site_file(path: Path, taken: set[str]) -> SiteFile:
    """Read one export as the draft needs it: delimiter, encoding and number format guessed.

    Args:
        path: a site's CSV (or Parquet) file.
        taken: site names already used (the new one is added).

    Returns:
        The file's table (as text) and how it is written.
    """
    path = Path(path)
    if not path.is_file():
        raise DraftError(f"{path}: file not found")
    delimiter, encoding = _sniff(path) if path.suffix.lower() not in {".parquet", ".pq"} else (",", "utf-8")
    frame = read_table(path, delimiter=delimiter, encoding=encoding)
    frame.columns = [str(c).strip() for c in frame.columns]
    number_format = _number_format(frame)
    shape = frame.shape
    parsed = parse_numbers(pd.Series(frame.to_numpy(dtype=object).ravel(order="F")), number_format)
    numbers, missing, bad = (a.reshape(shape, order="F") for a in parsed)
    name = _site_name(path, taken)
    return SiteFile(name, path, frame, delimiter, encoding, number_format, numbers, missing, bad)


def _outward(low: float, high: float, integer: bool) -> tuple[float, float]:
    """A plausible range around the data's: bounds rounded outward to the span's leading digit.

    E.g. 29..77 gives 25..80 and 85..603 gives 50..650: the draft does not publish a site's exact
    minimum and maximum, and other sites' values a little beyond them still fit.
    """
    span = high - low
    if span <= 0:
        span = abs(high) or 1.0
    step = 10.0 ** math.floor(math.log10(span)) / 2
    lo, hi = math.floor(low / step) * step, math.ceil(high / step) * step
    if low >= 0 > lo:
        lo = 0.0
    if hi <= lo:
        hi = lo + step
    if integer or step >= 1:
        return float(round(lo)), float(round(hi))
    digits = max(0, -math.floor(math.log10(step)))
    return round(lo, digits), round(hi, digits)


def _column(name: str, cells: Callable[[], pd.Series], numbers: np.ndarray, missing: np.ndarray,
            bad: np.ndarray, site_of: np.ndarray) -> Column:
    """Decide one column's type from all sites' cells (never keeping a value except categories).

    Args:
        name: the column.
        cells: its cells at every site holding it, in order (built only for a text column).
        numbers: the cells as numbers (each site's format), NaN where not one.
        missing: cells that are a missing-value token.
        bad: cells that are not numbers.
        site_of: which site each cell comes from (an identifier is unique within a site).

    Returns:
        The column's kind, range or categories, and why it is left out when it is.
    """
    present = ~missing
    count = int(present.sum())
    can_be_missing = bool(missing.any())
    if count == 0:
        return Column(name, "ignore", "empty: no value in any row")
    numeric = not bad[present].any()
    at = site_of[present]
    if numeric:  # numbers only: no text operation on the (many) numeric columns
        values = numbers[present]
        distinct = len(np.unique(values))
        integer = bool(np.all(np.mod(values, 1) == 0))
        unique = count >= 10 and all(len(np.unique(values[at == k])) == int((at == k).sum())
                                     for k in np.unique(at))
        text = pd.Series([], dtype=str)
    else:
        text = cells()[present].astype(str).str.strip()
        if text.str.fullmatch(DATE).mean() > 0.8:
            return Column(name, "ignore", "date-like: dates are not model inputs (derive e.g. an age first)")
        distinct, integer = text.nunique(), False
        unique = count >= 10 and all(text[at == k].nunique() == int((at == k).sum()) for k in np.unique(at))
    if unique and (not numeric or (integer and (ID_NAME.search(name) or _increasing(numbers[present])))):
        return Column(name, "ignore", "identifier-like: a distinct value in every row")
    if distinct == 1:
        return Column(name, "ignore", "constant: one value in every row, nothing to learn from")
    if numeric and distinct > 2:
        values = numbers[present]
        low, high = float(values.min()), float(values.max())
        lo, hi = _outward(low, high, integer)
        tail, middle = float(np.quantile(values, 0.99)), float(np.median(values))
        skewed = low >= 0 and high >= 100 and tail > 20 * (middle + 1)
        return Column(name, "numeric", "", lo, hi, integer, can_be_missing=can_be_missing, skewed=skewed)
    if not numeric and distinct > MAX_CATEGORIES:
        return Column(name, "ignore", f"free text: more than {MAX_CATEGORIES} distinct values")
    kind = "binary" if distinct == 2 else "categorical"
    if numeric:
        text = cells()[present].astype(str).str.strip()
    return Column(name, "categorical", kind, values=_spelled(text), can_be_missing=can_be_missing)


def _increasing(values: np.ndarray) -> bool:
    return bool(np.all(np.diff(values) > 0))


def _natural(text: str) -> tuple[float, str]:
    try:
        return (float(text), text)
    except ValueError:
        return (math.inf, text.casefold())


def _cells(
    sites: Sequence[SiteFile], name: str
) -> tuple[Callable[[], pd.Series], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A column over every site holding it, each site's cells read in its own number format:
    (the cells as text, built on demand; numbers; missing; not numbers; the site index of each cell)."""
    holding = [(k, s) for k, s in enumerate(sites) if name in s.frame.columns]
    parts = [(*s.column(name), np.full(len(s.frame), k)) for k, s in holding]

    def cells() -> pd.Series:
        return pd.concat([s.frame[name].astype(str) for _, s in holding], ignore_index=True)

    numbers, missing, bad, site = (np.concatenate([p[k] for p in parts]) for k in range(4))
    return cells, numbers, missing, bad, site


def _group_key(name: str) -> str | None:
    """The shared prefix of a run of columns: `GENE_` of `GENE_17`, `expr.` of `expr.TP53`, `G` of `G17`."""
    match = PREFIX.match(name)
    if match is None:
        return None
    return match["prefix"] if match["prefix"] is not None else match["stem"]


def _same_shaped(columns: list[Column]) -> bool:
    """True when one shared range fits every column: all non-negative (or all not), maxima within
    SAME_SHAPE of each other. Twenty lab values sharing `lab_` in different units are not a group."""
    highs = [abs(c.high) for c in columns]
    signs = {c.low >= 0 for c in columns}
    return len(signs) == 1 and max(highs) <= SAME_SHAPE * max(min(highs), 1e-12)


def _toml(value: object) -> str:
    """One TOML value as written inline, on one line (inline tables must fit on one)."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def _wrapped(values: Sequence[object], per_line: int = 8) -> str:
    """A long array over several lines, `per_line` items each."""
    rows = [", ".join(_toml(v) for v in values[i:i + per_line]) for i in range(0, len(values), per_line)]
    return "[\n" + "".join(f"    {row},\n" for row in rows) + "]"


def _number(value: float, integer: bool = True) -> int | float:
    return int(value) if integer and float(value).is_integer() else float(value)


def _labels(values: list[str]) -> list[int | float | str]:
    out: list[int | float | str] = []
    for v in values:
        try:
            number = float(v)
            out.append(int(number) if number.is_integer() else number)
        except ValueError:
            out.append(v)
    return out


SURVIVAL_INTERVALS = 10


def _time_grid(sites: Sequence[SiteFile], time: str) -> list[float]:
    """A survival study's discrete-time grid: equal intervals up to the longest follow-up in the
    files, rounded outward (so the draft does not publish a site's exact longest follow-up).

    Raises:
        DraftError: the time column holds no positive number.
    """
    _, numbers, missing, bad, _ = _cells(sites, time)
    usable = numbers[~missing & ~bad]
    usable = usable[np.isfinite(usable) & (usable > 0)]
    if usable.size == 0:
        raise DraftError(f"--time {time!r}: no positive follow-up time in the files")
    _, top = _outward(0.0, float(usable.max()), integer=True)
    step = top / SURVIVAL_INTERVALS
    return [float(round(step * (k + 1), 6)) for k in range(SURVIVAL_INTERVALS)]


def _category_values(values: list[str]) -> list[int | str]:
    """Categories as the contract takes them: integers for integer codes, text otherwise."""
    return [v if isinstance(v, int) else str(v) for v in (_labels(values) if all(
        isinstance(x, int) for x in _labels(values)) else values)]


POSITIVE_WORDS = {"1", "yes", "y", "true", "positive", "pos", "case", "event", "dead", "died", "relapse"}


def _target_lines(sites: Sequence[SiteFile], target: str | None, time: str | None, event: str | None,
                  task: str | None) -> tuple[str, list[str]]:
    """The task and the `target = ...` line(s) of the contract, with review comments."""
    if time or event:
        if not (time and event):
            raise DraftError("--time and --event go together (a survival target)")
        _require(sites, time, "--time")
        _require(sites, event, "--event")
        cells, _, emissing, _, _ = _cells(sites, event)
        codes = _spelled(cells()[~emissing])
        positive = [c for c in codes if c.casefold() in POSITIVE_WORDS] or codes[-1:]
        censored = [c for c in codes if c not in positive]
        return "survival", [
            f"# survival: {event!r} codes {codes} were {REVIEW}; which mean the event is a guess",
            f"# the time grid ({SURVIVAL_INTERVALS} equal intervals up to the longest follow-up rounded "
            f"outward) was {REVIEW}",
            f"target = {{ time = {_toml(time)}, event = {_toml(event)}, "
            f"event_values = {_toml(_labels(positive))}, censored_values = {_toml(_labels(censored))}, "
            f"intervals = {_toml(_time_grid(sites, time))}, time_unit = \"days\" }}  # check time_unit",
        ]
    if target is None:
        raise DraftError("give the outcome: --target COL, or --time COL --event COL for survival")
    _require(sites, target, "--target")
    cells, numbers, missing, bad, _ = _cells(sites, target)
    present = ~missing
    text = cells()[present].astype(str).str.strip()
    keys = _spelled(text)
    numeric = not bad[present].any()
    if len(keys) < 2:
        raise DraftError(f"--target {target!r}: {len(keys)} distinct value(s) in the files; an outcome needs "
                         "at least 2")
    if task is None:
        if len(keys) == 2:
            task = "binary-classification"
        elif len(keys) <= MAX_CLASSES and (not numeric or np.all(np.mod(numbers[present], 1) == 0)):
            task = "multiclass-classification"
        elif numeric:
            task = "regression"
        else:
            raise DraftError(f"--target {target!r}: {len(keys)} distinct text values; give --task, or pick "
                             "another column")
    if task == "binary-classification":
        if len(keys) != 2:
            raise DraftError(f"--target {target!r}: binary classification needs 2 distinct values, found "
                             f"{len(keys)}")
        positive = [k for k in keys if k.casefold() in POSITIVE_WORDS][:1] or keys[-1:]
        negative = [k for k in keys if k not in positive]
        return task, [f"# which value is positive is a guess ({REVIEW})",
                      f"target = {{ name = {_toml(target)}, positive = {_toml(_labels(positive))}, "
                      f"negative = {_toml(_labels(negative))} }}"]
    if task == "multiclass-classification":
        return task, [f"# classes {REVIEW}",
                      f"target = {{ name = {_toml(target)}, classes = {_toml(_labels(keys))} }}"]
    if task == "regression":
        if not numeric:
            raise DraftError(f"--target {target!r}: regression needs a numeric column")
        values = numbers[present]
        lo, hi = _outward(float(values.min()), float(values.max()), False)
        return task, [f"# range {REVIEW}",
                      f"target = {{ name = {_toml(target)}, type = \"numeric\", min = {_toml(_number(lo))}, "
                      f"max = {_toml(_number(hi))} }}"]
    raise DraftError(f"--task {task!r}: survival needs --time and --event; expected one of {list(TASKS)}")


def _spelled(cells: pd.Series) -> list[str]:
    """The distinct values of cells, one per category key: numbers canonical ('1' for '1.0'), text as
    first written (a target's labels are matched case-sensitively)."""
    spellings: dict[str, str] = {}
    for value in cells.astype(str).str.strip():
        key = category_key(value)
        spellings.setdefault(key, key if _natural(key)[0] != math.inf else value)
    return sorted(spellings.values(), key=_natural)


def _require(sites: Sequence[SiteFile], column: str, option: str) -> None:
    lacking = [s.name for s in sites if column not in s.frame.columns]
    if lacking:
        raise DraftError(f"{option} {column!r}: no such column in the file(s) of {lacking}")


def _feature_block(column: Column) -> list[str]:
    lines = ["", "[[contract.features]]", f"name = {_toml(column.name)}"]
    if column.kind == "numeric":
        lines += ["type = \"numeric\"", f"min = {_toml(_number(column.low))}  # rounded outward; {REVIEW}",
                  f"max = {_toml(_number(column.high))}"]
        if column.skewed:
            lines.append("transform = \"log1p\"  # skewed: a few values far above the median")
    else:
        lines += ["type = \"categorical\"",
                  f"values = {_toml(_category_values(column.values))}  # {column.why}; {REVIEW}"]
    return lines


def _group_block(prefix: str, columns: list[Column]) -> list[str]:
    low = min(c.low for c in columns)
    high = max(c.high for c in columns)
    missing = any(c.can_be_missing for c in columns)
    lines = ["", "[[contract.feature_groups]]", f"name = {_toml(prefix.rstrip('_.-') or 'group')}",
             f"# {len(columns)} numeric columns sharing the prefix {prefix!r}, in file order",
             f"columns = {_wrapped([c.name for c in columns])}",
             "type = \"numeric\"",
             f"min = {_toml(_number(low))}  # rounded outward, over the group; {REVIEW}",
             f"max = {_toml(_number(high))}"]
    if any(c.skewed for c in columns):
        lines.append("transform = \"log1p\"  # skewed: a few values far above the median")
    lines.append(f"missing = {_toml('impute' if missing else 'error')}  # "
                 + ("some cells are missing: imputed, with indicator inputs" if missing else
                    "no cell is missing here: no indicator inputs; a missing cell at another site is "
                    "refused"))
    return lines


def draft_study(
    files: Sequence[Path],
    *,
    target: str | None = None,
    time: str | None = None,
    event: str | None = None,
    task: str | None = None,
    ignore: Sequence[str] = (),
    out: Path | None = None,
    name: str | None = None,
) -> str:
    """A complete study TOML drafted from the sites' export files.

    Args:
        files: one export per site (each becomes a `[[sites]]` entry named after its file).
        target: the outcome column (binary, multiclass or regression; the task inferred unless `task`).
        time: survival: the follow-up time column (with `event`).
        event: survival: the event indicator column.
        task: the task, when the inference from the target should be overridden.
        ignore: columns to leave out (listed under `ignore_columns`).
        out: where the study will be written: the sites' data paths are written relative to it.
        name: the study's name (default: the out file's stem, or "draft").

    Returns:
        The study's text: runnable as is for a binary target, with comments on every line read
        from the data.

    Raises:
        DraftError: a file cannot be read, or the target is not in every file.
    """
    if not files:
        raise DraftError("give at least one site file")
    if task is not None and task not in TASKS:
        raise DraftError(f"--task: got {task!r}; expected one of {', '.join(TASKS)}")
    taken: set[str] = set()
    try:
        sites = [read_site_file(Path(f), taken) for f in files]
    except ValueError as exc:  # DataValidationError: file not found, unreadable, malformed
        raise DraftError(str(exc).splitlines()[-1].strip()) from None
    task, target_lines = _target_lines(sites, target, time, event, task)
    outcome = {c for c in (target, time, event) if c}
    order = list(dict.fromkeys(c for site in sites for c in site.frame.columns))
    columns = [_column(c, *_cells(sites, c)) if c not in ignore else Column(c, "ignore", "--ignore")
               for c in order if c not in outcome]
    everywhere = set.intersection(*(set(s.frame.columns) for s in sites))
    for column in columns:
        if column.kind != "ignore" and column.name not in everywhere:
            column.kind, column.why = "ignore", "not in every site's file"
    groups: dict[str, list[Column]] = {}
    for column in columns:
        key = _group_key(column.name) if column.kind == "numeric" else None
        if key:
            groups.setdefault(key, []).append(column)
    grouped = {p: cs for p, cs in groups.items() if len(cs) >= GROUP_MIN_COLUMNS and _same_shaped(cs)}
    in_group = {c.name for cs in grouped.values() for c in cs}
    study_name = name or (re.sub(r"[^A-Za-z0-9._-]+", "-", out.stem).strip("-._") if out else "") or "draft"
    lines = [
        f"# Drafted by `pmfl contract draft` from {len(sites)} file(s). Lines marked \"{REVIEW}\"",
        "# reveal something about that site's patients (categories present, rounded ranges): review them,",
        "# widen ranges to clinically plausible bounds, and only then share the study with other sites.",
        "",
        "[study]",
        f"name = {_toml(study_name if NAME_PATTERN.match(study_name) else 'draft')}",
        f"task = {_toml(task)}",
        "rounds = 20",
        "seed = 0",
        "",
        "[model]",
        "name = \"logreg\"",
        "",
        "[training]",
        "local_epochs = 1",
        "batch_size = 16",
        "learning_rate = 0.5",
        "max_grad_norm = 1.0",
        "",
        "[privacy]  # each site's default budget; a site may set its own",
        "dp = true",
        "epsilon = 3.0",
        "delta = 1e-5",
        "",
        "[split]",
        "test_fraction = 0.3333333333333333",
        "seed = 42",
        "",
        "[contract]",
        "missing = \"impute\"",
        "missing_indicators = true",
    ]
    ignored = [c for c in columns if c.kind == "ignore"]
    if ignored:
        lines.append("ignore_columns = [")
        lines += [f"    {_toml(c.name)},  # {c.why}" for c in ignored]
        lines.append("]")
    lines += target_lines
    for column in columns:
        if column.kind != "ignore" and column.name not in in_group:
            lines += _feature_block(column)
    for prefix, members in grouped.items():
        lines += _group_block(prefix, members)
    base = Path(out).resolve().parent if out else None
    for site in sites:
        data = site.path.resolve()
        if base is not None:
            with contextlib.suppress(ValueError):  # elsewhere: the absolute path
                data = data.relative_to(base)
        lines += ["", "[[sites]]", f"name = {_toml(site.name)}", f"data = {_toml(str(data))}"]
        if site.delimiter != ",":
            lines.append(f"delimiter = {_toml(site.delimiter)}")
        if site.encoding != "utf-8":
            lines.append(f"encoding = {_toml(site.encoding)}")
        if site.number_format.thousands:
            lines.append(f"thousands = {_toml(site.number_format.thousands)}")
        if site.number_format.decimal != ".":
            lines.append(f"decimal = {_toml(site.number_format.decimal)}")
    return "\n".join(lines) + "\n"

