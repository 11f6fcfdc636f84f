"""`pmfl predict`: the study's contract and encoding, every tabular task's predictions as its metrics
compute them, refused rows listed without their values; nothing sent."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from client.predict import load_model, predict_file, write_predictions
from client.training import predict
from pm_common.data.tabular import read_table, validate_and_encode
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import StudyConfigError, load_study, study_from_dict
from pm_common.tasks import task_of
from pm_common.tasks.metrics import balanced_accuracy, harrell_c_index
from pm_common.tasks.survival import integrated_brier
from pmfl.cli import BAD_INPUT, app
from simulations.scenarios import scenario_path
from tests.conftest import heart_study


def _new_rows(source: Path, out: Path) -> None:
    """Five rows of `source` without the outcome; data row 3 has an implausible age, row 4 an unknown sex."""
    rows = list(csv.reader(source.open()))
    header = rows[0]
    keep = [i for i, c in enumerate(header) if c != "num"]
    table = [[r[i] for i in keep] for r in rows[:6]]
    table[3][header.index("age")] = "777"
    table[4][header.index("sex")] = "Xyzzy"
    csv.writer(out.open("w", newline="")).writerows(table)


def test_predict_applies_the_contract_and_never_echoes_values(tmp_path: Path,
                                                                          heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites)
    model = build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden, seed=3)
    torch.save({"study": study.name, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "config.toml").write_text(path.read_text())
    new = tmp_path / "new.csv"
    _new_rows(Path(heart_sites[1]["data"]), new)
    result = predict_file(load_model(tmp_path / "model.pt", study), study, new)
    assert result.rows == [1, 2, 5] and result.refused_rows == 2 and len(result.refused) == 2
    assert "column 'age': 1 row outside the plausible range [18, 100]" in result.refused[0]
    assert "(data row 3;" in result.refused[0]
    assert "column 'sex': 1 row with an unknown category; allowed: ['Male', 'Female']" in result.refused[1]
    assert "(data row 4;" in result.refused[1]
    # the same encoding as training: row 1 with its outcome, through the training path
    frame = read_table(Path(heart_sites[1]["data"])).iloc[[0]].copy()
    x = torch.from_numpy(validate_and_encode(frame, study.contract, new).x)
    expected = torch.sigmoid(model(x)).item()
    assert np.isclose(result.columns["probability"][0], expected, atol=1e-6)

    runner = CliRunner()
    out = tmp_path / "pred.csv"
    ran = runner.invoke(app, ["predict", str(tmp_path / "model.pt"), "--data", str(new), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    assert "777" not in ran.output and "Xyzzy" not in ran.output  # refused rows named, values never shown
    assert "column 'age'" in ran.output and "3 row(s) predicted" in ran.output
    lines = out.read_text().splitlines()
    assert lines[0] == "row,probability,class" and len(lines) == 4
    (tmp_path / "short.csv").write_text("age,sex\n50,Male\n")
    short = runner.invoke(app, ["predict", str(tmp_path / "model.pt"), "--data", str(tmp_path / "short.csv")])
    assert short.exit_code == BAD_INPUT and "11 missing column(s)" in short.output
    assert "Traceback" not in short.output


def test_predict_refuses_a_fedper_model_pt(tmp_path: Path, heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites, model={"name": "mlp", "hidden": [8]},
                              personalization={"method": "fedper", "local_layers": ["net.2"]})
    full = build_tabular_model("mlp", study.contract.num_inputs, (8,)).state_dict()
    shared = {k: v for k, v in full.items() if not k.startswith("net.2")}
    torch.save({"study": study.name, "state_dict": shared}, tmp_path / "model.pt")
    (tmp_path / "config.toml").write_text(path.read_text())
    (tmp_path / "new.csv").write_text("age,sex\n50,Male\n")
    runner = CliRunner()
    refused = runner.invoke(app, ["predict", str(tmp_path / "model.pt"), "--data",
                                  str(tmp_path / "new.csv")])
    assert refused.exit_code == BAD_INPUT and "personal model" in refused.output
    assert "Traceback" not in refused.output


SCENARIOS = ["heart-disease", "heart-disease-severity", "diabetes-progression", "tcga-brca"]


def _recomputed(study, columns: dict, y: np.ndarray) -> dict[str, float]:
    """The task's headline metrics recomputed from the prediction columns alone."""
    task, target = task_of(study), study.contract.target
    if study.task == "binary-classification":
        return {"accuracy": float(np.mean(columns["class"] == y)),
                "auc": float(roc_auc_score(y, columns["probability"]))}
    if study.task == "multiclass-classification":
        codes = np.asarray(target.classes, dtype=object)[y.astype(int)]
        predicted = torch.tensor([target.classes.index(c) for c in columns["class"]])
        aucs = [roc_auc_score(y == i, columns[f"probability_{c}"]) for i, c in enumerate(target.classes)
                if 0 < (y == i).sum() < len(y)]
        return {"accuracy": float(np.mean(columns["class"] == codes)),
                "balanced_accuracy": balanced_accuracy(predicted, torch.from_numpy(y).long()),
                "auc": float(np.mean(aucs))}
    if study.task == "regression":
        predicted = columns[f"predicted_{target.name}_{target.unit}"]
        actual = target.unscale(y.astype(np.float64))
        return {"mae": float(np.abs(predicted - actual).mean()),
                "r2": 1 - float(((predicted - actual) ** 2).sum() / ((actual - actual.mean()) ** 2).sum())}
    unit = target.time_unit
    curves = np.stack([columns[f"survival_at_{h:g}_{unit}"] for h in target.horizons], 1)
    end = target.intervals[task.risk_intervals - 1]
    time, event = y[:, 0].astype(np.float64), y[:, 1].astype(np.float64)
    return {"c_index": harrell_c_index(columns[f"cumulative_hazard_to_{end:g}_{unit}"], time, event),
            "integrated_brier": integrated_brier(curves, target.horizons, time, event)}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_predictions_are_what_the_tasks_metrics_compute(tmp_path: Path, scenario: str) -> None:
    """Each task's prediction columns, on rows without their outcome, give the metrics the task
    computes from the same model on the same rows encoded (with their outcome) for training."""
    study = load_study(scenario_path(scenario))
    task = task_of(study)
    model = task.build_model(study, seed=3)
    source = study.sites[0].data
    frame = read_table(source).iloc[:80]
    encoded = validate_and_encode(frame.copy(), study.contract, source)  # the training path
    expected = task.metrics(predict(model, torch.from_numpy(encoded.x)), torch.from_numpy(encoded.y))
    new = tmp_path / "new.csv"
    frame.drop(columns=list(study.contract.target.columns)).to_csv(new, index=False)
    result = predict_file(model, study, new)
    assert len(result.rows) == len(encoded.y) and result.refused_rows == encoded.rows_dropped
    for name, value in _recomputed(study, result.columns, encoded.y).items():
        assert np.isclose(value, expected[name], atol=1e-6), name
    write_predictions(result, tmp_path / "out.csv")
    written = pd.read_csv(tmp_path / "out.csv")
    assert list(written.columns) == ["row", *result.columns] and len(written) == len(result.rows)


def test_prediction_columns_name_the_classes_unit_and_horizons() -> None:
    """What a hospital reads in the header: each class, the target's unit, each horizon and its unit."""
    names = {}
    for scenario in SCENARIOS[1:]:
        study = load_study(scenario_path(scenario))
        task = task_of(study)
        outputs = task.build_model(study)(torch.zeros(2, study.contract.num_inputs))
        names[scenario] = list(task.predictions(outputs))
    assert names["heart-disease-severity"] == [f"probability_{c}" for c in "01234"] + ["class"]
    assert names["diabetes-progression"] == ["predicted_progression_points"]
    assert names["tcga-brca"] == ["survival_at_365_days", "survival_at_1095_days", "survival_at_1825_days",
                                  "cumulative_hazard_to_1825_days"]


def test_a_bad_row_is_listed_without_its_value_and_the_others_predicted(tmp_path: Path) -> None:
    """Survival rows: a feature that is not a number refuses its row (listed with what is allowed, not
    the value); outcome columns present with nonsense are ignored, as new rows have no outcome."""
    study = load_study(scenario_path("tcga-brca"))
    source = study.sites[0].data
    frame = read_table(source).iloc[:6].copy()
    frame.loc[frame.index[1], "age_at_index"] = "abc9177"
    frame.loc[frame.index[4], "T"] = "-9177"  # the outcome is not needed to predict
    new = tmp_path / "new.csv"
    frame.to_csv(new, index=False)
    result = predict_file(task_of(study).build_model(study), study, new)
    assert result.rows == [1, 3, 4, 5, 6] and result.refused_rows == 1
    [line] = result.refused
    assert ("column 'age_at_index': 1 row not a number (data row 2;" in line
            and line.endswith("allowed: a number in [18, 100] years"))
    assert "9177" not in line and "abc" not in line


def test_image_studies_are_refused_in_one_line() -> None:
    raw = tomllib.loads(scenario_path("imaging-synthetic").read_text(encoding="utf-8"))
    raw.pop("synthetic")  # no data needed: refused before any is read
    study = study_from_dict(raw, Path("."))
    with pytest.raises(StudyConfigError, match=r"tabular studies; .* images is not supported") as info:
        predict_file(torch.nn.Identity(), study, Path("unused.csv"))
    assert "\n" not in str(info.value)
