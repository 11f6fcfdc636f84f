"""`pmfl contract draft` (issue #15, item 3): a runnable study drafted from the sites' own files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pm_common.data.draft import DraftError, draft_study
from pm_common.study.config import load_study
from pmfl.cli import app
from simulations.preflight import preflight
from tests.conftest import HEART

DATA = HEART.parent.parent.parent / "pm_common/datasets/heart_disease"


def _export(source: str, dest: Path, european: bool = False) -> Path:
    """A hospital's export: a yes/no outcome, a patient number, a visit date; optionally `;` and `3,5`."""
    frame = pd.read_csv(DATA / f"{source}.csv", dtype=str, keep_default_na=False)
    frame["disease"] = np.where(frame.pop("num").astype(int) > 0, "yes", "no")
    frame["mrn"] = [f"P{100000 + i}" for i in range(len(frame))]
    frame["visit_date"] = [f"2021-0{1 + i % 9}-1{i % 10}" for i in range(len(frame))]
    if european:
        frame["oldpeak"] = frame["oldpeak"].str.replace(".", ",", regex=False)
        frame.to_csv(dest, index=False, sep=";")
    else:
        frame.to_csv(dest, index=False)
    return dest


def test_a_binary_draft_runs_as_is_end_to_end(tmp_path: Path) -> None:
    a = _export("cleveland", tmp_path / "cleveland-2024.csv")
    b = _export("hungary", tmp_path / "hungary.csv", european=True)
    study_path = tmp_path / "study.toml"
    runner = CliRunner()
    drafted = runner.invoke(app, ["contract", "draft", str(a), str(b), "--target", "disease",
                                  "--ignore", "dataset", "--out", str(study_path)])
    assert drafted.exit_code == 0, drafted.output
    text = study_path.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    assert raw["study"]["task"] == "binary-classification"
    assert raw["contract"]["target"] == {"name": "disease", "positive": ["yes"], "negative": ["no"]}
    assert [s["name"] for s in raw["sites"]] == ["cleveland-2024", "hungary"]
    assert raw["sites"][1] | {"data": ""} == {"name": "hungary", "data": "", "delimiter": ";", "decimal": ","}
    assert raw["contract"]["ignore_columns"] == ["id", "dataset", "mrn", "visit_date"]
    assert '"mrn",  # identifier-like: a distinct value in every row' in text
    assert '"visit_date",  # date-like' in text
    assert "P100000" not in text and "2021-01-10" not in text  # ignored columns are never quoted
    features = {f["name"]: f for f in raw["contract"]["features"]}
    ages = pd.concat([pd.read_csv(DATA / f"{s}.csv")["age"] for s in ("cleveland", "hungary")])
    assert features["age"]["min"] < ages.min() and features["age"]["max"] >= ages.max()  # rounded outward
    assert features["sex"] == {"name": "sex", "type": "categorical", "values": ["Female", "Male"]}
    assert text.count("review before the study is shared") >= len(features)
    study = load_study(study_path)
    assert [p.site.name for p in preflight(study, plans=False)] == ["cleveland-2024", "hungary"]
    out = tmp_path / "run"
    ran = runner.invoke(app, ["simulate", "--config", str(study_path), "--out", str(out), "--rounds", "1"])
    assert ran.exit_code == 0, ran.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["rounds"][-1]["trained"]) == ["cleveland-2024", "hungary"]


def test_omics_columns_become_one_feature_group_and_targets_pick_their_task(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(np.round(rng.lognormal(2, 1.5, size=(40, 25)), 3),
                         columns=[f"GENE_{i}" for i in range(1, 26)])
    frame["stage"] = rng.choice(["I", "II", "III"], size=40)
    frame["dose"] = np.round(rng.uniform(3, 97, size=40), 1)
    frame["months"] = rng.integers(1, 120, size=40)
    frame["dead"] = rng.integers(0, 2, size=40)
    frame["outcome"] = rng.choice(["0", "1.0"], size=40)
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    text = draft_study([path], target="outcome", ignore=["stage", "dose", "months", "dead"])
    raw = tomllib.loads(text)
    (group,) = raw["contract"]["feature_groups"]
    assert group["columns"] == [f"GENE_{i}" for i in range(1, 26)] and group["missing"] == "error"
    assert group["min"] <= frame.iloc[:, :25].min().min() and group["max"] >= frame.iloc[:, :25].max().max()
    assert raw["contract"]["target"] == {"name": "outcome", "positive": [1], "negative": [0]}
    assert "features" not in raw["contract"]
    multiclass = draft_study([path], target="stage")
    assert 'target = { name = "stage", classes = ["I", "II", "III"] }' in multiclass
    assert 'task = "multiclass-classification"' in multiclass
    regression_text = draft_study([path], target="dose")
    regression = tomllib.loads(regression_text)
    dose = regression["contract"]["target"]
    assert set(dose) == {"name", "type", "min", "max"} and dose["type"] == "numeric"
    assert dose["min"] <= frame["dose"].min() < dose["min"] + 5  # rounded outward, in steps of 5
    assert dose["max"] - 5 < frame["dose"].max() <= dose["max"]
    assert regression["study"]["task"] == "regression"
    survival = draft_study([path], time="months", event="dead")
    target = tomllib.loads(survival)["contract"]["target"]
    assert {k: v for k, v in target.items() if k != "intervals"} == {
        "time": "months", "event": "dead", "event_values": [1], "censored_values": [0], "time_unit": "days"}
    assert len(target["intervals"]) == 10 and target["intervals"][-1] >= frame["months"].max()
    for drafted, task in ((multiclass, "multiclass-classification"), (regression_text, "regression"),
                          (survival, "survival")):  # each draft is a study pmfl accepts as it is
        (tmp_path / "drafted.toml").write_text(drafted)
        assert load_study(tmp_path / "drafted.toml").task == task
    labs = pd.DataFrame({f"lab_{i}": rng.uniform(0, 10 ** (i % 5), 40) for i in range(25)})
    symbols = pd.DataFrame({f"expr.{g}{i}": rng.uniform(0, 50, 40)
                            for i, g in enumerate(["TP", "EGFR"] * 12)})
    pd.concat([labs, symbols, frame[["outcome"]]], axis=1).to_csv(tmp_path / "mixed.csv", index=False)
    mixed = tomllib.loads(draft_study([tmp_path / "mixed.csv"], target="outcome"))["contract"]
    assert [g["name"] for g in mixed["feature_groups"]] == ["expr"]  # lab_ ranges differ 10,000-fold
    assert len(mixed["feature_groups"][0]["columns"]) == 24 and len(mixed["features"]) == 25
    with pytest.raises(DraftError, match=r"--target 'nope': no such column in the file\(s\) of \['site'\]"):
        draft_study([path], target="nope")
    frame.assign(outcome="1").to_csv(path, index=False)
    with pytest.raises(DraftError, match=r"--target 'outcome': 1 distinct value\(s\) in the files"):
        draft_study([path], target="outcome")
