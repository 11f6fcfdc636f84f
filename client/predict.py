"""Apply a trained model to new patients' rows at a site: the study's contract, its encoding, the
global model (model.pt) or the site's personal model; nothing is sent anywhere.

Why row by row: one bad row must not stop the others. Each row is validated and encoded exactly as
training rows are (pm_common/data/tabular.py `validate_and_encode`); a row that fails is listed by
its number and column only: never its values (the file is the site's own, but the listing may end
up in a log).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.training import predict
from pm_common.data.contract import CategoricalFeature
from pm_common.data.tabular import DataValidationError, read_table, validate_and_encode
from pm_common.study.config import StudyConfig, StudyConfigError
from pm_common.tasks import task_of


@dataclass(frozen=True)
class Predictions:
    """One probability and class per row that meets the contract; the others by number."""

    rows: list[int]  # 1-based data-row numbers, as the file has them
    probability: list[float]
    refused: list[str]  # "row R, column C: does not meet the contract", no values


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
                 encoding: str = "utf-8") -> Predictions:
    """Predict every row of `data` that meets the study's contract.

    Args:
        model: the model (`load_model`).
        study: the study (its contract).
        data: the new rows; the outcome column may be absent.
        delimiter: the file's delimiter.
        encoding: the file's text encoding.

    Returns:
        The predictions and the rows refused.

    Raises:
        StudyConfigError: the study is not tabular.
        DataValidationError: the file itself cannot be read or lacks the contract's columns.
    """
    contract = study.contract
    if contract is None or study.task != "binary-classification":
        raise StudyConfigError(f"pmfl predict applies to tabular binary studies; this study's task is "
                               f"{study.task!r}")
    frame = read_table(data, delimiter=delimiter, encoding=encoding)
    frame.columns = [str(c).strip() for c in frame.columns]
    if contract.target.name not in frame.columns:  # new patients: no outcome yet
        frame[contract.target.name] = contract.target.negative[0]
    one_row = replace(contract, min_rows=1)
    rows, encoded, refused = [], [], []
    for i in range(len(frame)):
        try:
            table = validate_and_encode(frame.iloc[[i]].copy(), one_row, data)
        except DataValidationError as exc:
            if any(p.row is None for p in exc.problems):
                raise  # the file's columns: nothing can be predicted
            refused.extend(f"row {i + 1}, column {p.column!r}: does not meet the contract; allowed: "
                           f"{_allowed(study, p.column)}" for p in exc.problems)
            continue
        if len(table.x):
            rows.append(i + 1)
            encoded.append(table.x[0])
        else:  # contract.missing = "drop"
            refused.append(f"row {i + 1}: missing values, which the contract drops")
    probability: list[float] = []
    if encoded:
        logits = predict(model, torch.from_numpy(np.stack(encoded)))
        probability = torch.sigmoid(logits).tolist()
    return Predictions(rows, probability, refused)


def _allowed(study: StudyConfig, column: str | None) -> str:
    """What the contract allows in `column` (never what the row holds)."""
    assert study.contract is not None
    for feature in study.contract.features:
        if feature.name == column:
            if isinstance(feature, CategoricalFeature):
                return ", ".join(repr(v) for v in feature.values) + " (or empty, if the contract imputes)"
            return f"a number in [{feature.min:g}, {feature.max:g}] (or empty, if the contract imputes)"
    return "see the study's contract"


def write_predictions(predictions: Predictions, out: Path) -> None:
    """One line per predicted row: its number, the probability of the positive outcome, the class at 0.5."""
    pd.DataFrame({
        "row": predictions.rows,
        "probability": predictions.probability,
        "class": [int(p >= 0.5) for p in predictions.probability],
    }).to_csv(out, index=False)
