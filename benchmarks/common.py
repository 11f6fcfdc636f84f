"""What every benchmark shares: machine facts, a printed table and a JSON file of results."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import bootstrap

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """Facts about the machine and software a result was measured on, stored with every result.

    Timings depend on the cores, the platform and the torch/CUDA build, so a results file must say where
    and when it was measured to be compared with a later run or another machine.

    Returns:
        Core count, platform, Python and torch versions, the first CUDA device's name (None without
        one) and the UTC date and time of the measurement.
    """
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def median(values: Sequence[float]) -> float:
    """The median the benchmarks report: robust to the odd slow run on a shared machine.

    Returned as a built-in float whatever the inputs' type, so the tables and the JSON files treat it as one.

    Args:
        values: repeated measurements of one quantity (non-empty).

    Returns:
        Their median.
    """
    return float(statistics.median(values))


def median_difference_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.9
) -> tuple[float, float]:
    """Percentile bootstrap interval of median(a) - median(b), the two drawn independently: how far
    run-to-run noise alone (here DP noise, which a seed does not fix) moves a difference of medians."""
    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(x, axis=axis) - np.median(y, axis=axis)

    result = bootstrap((list(a), list(b)), statistic, confidence_level=level, method="percentile",
                       n_resamples=4000, rng=np.random.default_rng(0))
    low, high = result.confidence_interval
    return float(low), float(high)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print results as a Markdown table, so a benchmark's output can be pasted into the docs as it is.

    Columns are padded to their widest cell; floats get 3 decimals (1 from 100 on) and None prints as "-".

    Args:
        title: the line printed above the table.
        header: the column names.
        rows: one sequence of cells per row, as long as `header`.
    """
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write a benchmark's results to benchmarks/results/NAME.json, with the machine they were measured on.

    The JSON file is a run's lasting record (the printed table is not); a later run of the same name
    overwrites it.

    Args:
        name: the file's name without ".json" (usually the benchmark's).
        payload: the results; `machine()`'s facts are added under "machine".

    Returns:
        The path written.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"\nwrote {path}")
    return path
