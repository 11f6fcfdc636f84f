"""Apply a trained model to new patients' rows at a site: the study's contract, its encoding, the
global model (model.pt) or the site's personal model; nothing is sent anywhere.

Every row is checked and encoded at once, exactly as training rows are (pm_common/data/tabular.py
`check_rows`, which `validate_and_encode` uses for training); the outcome columns may be absent. A
row that fails the contract gets no prediction and is listed as training files' problems are:
grouped by column and kind, with the data rows and what the contract allows, never the cell's value
(the file is the site's own, but the listing may end up in a log). The good rows are predicted all
the same. What a prediction is (probability, class, value in the target's unit, survival at the
study's horizons) is the task's own (`Task.predictions`, the same maths its metrics use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.training import predict
from pm_common.data.contract import CategoricalFeature, DataContract
from pm_common.data.tabular import (
    ROWS_SHOWN,
    DataValidationError,
    NumberFormat,
    Problem,
    check_rows,
    read_table,
)
from pm_common.study.config import StudyConfig, StudyConfigError
from pm_common.tasks import task_of
from pm_common.tasks.base import Predictor


@dataclass(frozen=True)
class Predictions:
    """The task's prediction columns for every row that meets the contract; the others listed."""

    rows: list[int]  # 1-based data-row numbers, as the file has them
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # one value per predicted row
    refused: list[str] = field(default_factory=list)  # one line per column and kind of problem, no values
    refused_rows: int = 0  # how many rows got no prediction


def load_model(path: Path, study: StudyConfig) -> torch.nn.Module:
    """The study's model with the arrays of `path` (a run's model.pt or a site's personal model).

    Raises:
        StudyConfigError: the file is not a model of this study, or lacks layers (fedper's model.pt).
    """
    try:
        saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise StudyConfigError(f"{path}: not a readable pmfl model file ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise StudyConfigError(f"{path}: not a pmfl model file (no state_dict)")
    if saved.get("study", study.name) != study.name:
        raise StudyConfigError(f"{path}: a model of study {saved.get('study')!r}, not {study.name!r}")
    model = task_of(study).build_model(study)
    loaded = model.load_state_dict(saved["state_dict"], strict=False)
    if loaded.missing_keys or loaded.unexpected_keys:
        hint = (" (a fedper run's model.pt holds the shared layers only: use a site's personal model)"
                if study.personalization.local_layers else "")
        missing, unexpected = len(loaded.missing_keys), len(loaded.unexpected_keys)
        raise StudyConfigError(f"{path}: its arrays do not match the study's model: {missing} missing, "
                               f"{unexpected} unexpected{hint}")
    return model


def predict_file(model: torch.nn.Module, study: StudyConfig, data: Path, *, delimiter: str = ",",
                 encoding: str = "utf-8", number_format: NumberFormat | None = None) -> Predictions:
    """Predict every row of `data` that meets the study's contract.

    Args:
        model: the model (`load_model`).
        study: the study (its contract and task).
        data: the new rows; the outcome columns may be absent (and are ignored when present).
        delimiter: the file's delimiter.
        encoding: the file's text encoding.
        number_format: how the file writes numbers (the site's `thousands` and `decimal`; default
            plain `1234.5`).

    Returns:
        The predictions and the rows refused.

    Raises:
        StudyConfigError: the study is not tabular.
        DataValidationError: the file itself cannot be read or lacks the contract's columns.
    """
    task = task_of(study)
    contract = study.contract
    if contract is None or not isinstance(task, Predictor):
        raise StudyConfigError(f"pmfl predict applies to tabular studies; this study's task is "
                               f"{study.task!r} (predicting from images is not supported yet)")
    frame = read_table(data, delimiter=delimiter, encoding=encoding)
    checked = check_rows(frame, contract, number_format or NumberFormat(), outcome=False)
    whole_file = [p for p in checked.problems if not p.rows]
    if whole_file:
        raise DataValidationError(data, whole_file)  # its columns: nothing can be predicted
    refused = [_line(p, data, contract) for p in checked.problems]
    dropped = checked.dropped & ~checked.refused
    if dropped.any():
        found = Problem(tuple(int(r) + 1 for r in np.flatnonzero(dropped)[:ROWS_SHOWN]), None,
                        "with a missing value in a column whose missing policy is 'drop'", int(dropped.sum()))
        refused.append(found.describe(data))
    keep = np.flatnonzero(~(checked.refused | checked.dropped))
    columns: dict[str, np.ndarray] = {}
    if len(keep):
        columns = task.predictions(predict(model, torch.from_numpy(checked.x[keep])))
    return Predictions([int(r) + 1 for r in keep], columns, refused, len(frame) - len(keep))


def _line(problem: Problem, data: Path, contract: DataContract) -> str:
    """A problem as training files' are listed, with what the column allows when the message lacks it."""
    line = problem.describe(data)
    if problem.column is None or "allowed" in problem.message or "range" in problem.message:
        return line
    return f"{line}; allowed: {_allowed(contract, problem.column)}"


def _allowed(contract: DataContract, column: str) -> str:
    """What the contract allows in `column` (never what the row holds)."""
    for feature in contract.features:
        if feature.name == column:
            if isinstance(feature, CategoricalFeature):
                return repr(list(feature.values))
            unit = f" {feature.unit}" if feature.unit else ""
            return f"a number in [{feature.min:g}, {feature.max:g}]{unit}"
    return "see the study's contract"


def write_predictions(predictions: Predictions, out: Path) -> None:
    """One line per predicted row: its data-row number, then the task's prediction columns."""
    pd.DataFrame({"row": predictions.rows, **predictions.columns}).to_csv(out, index=False)
