"""`pmfl predict`: the study's contract and encoding, row by row, values never echoed; nothing sent."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from client.predict import load_model, predict_file
from pm_common.data.tabular import read_table, validate_and_encode
from pm_common.models.tabular import build_tabular_model
from pmfl.cli import BAD_INPUT, app
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


def test_predict_applies_the_contract_row_by_row_and_never_echoes_values(tmp_path: Path,
                                                                          heart_sites: list) -> None:
    path, study = heart_study(tmp_path, heart_sites)
    model = build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden, seed=3)
    torch.save({"study": study.name, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "config.toml").write_text(path.read_text())
    new = tmp_path / "new.csv"
    _new_rows(Path(heart_sites[1]["data"]), new)
    result = predict_file(load_model(tmp_path / "model.pt", study), study, new)
    assert result.rows == [1, 2, 5] and len(result.refused) == 2
    assert "row 3, column 'age'" in result.refused[0] and "[18, 100]" in result.refused[0]
    # the same encoding as training: row 1 with its outcome, through the training path
    frame = read_table(Path(heart_sites[1]["data"])).iloc[[0]].copy()
    x = torch.from_numpy(validate_and_encode(frame, study.contract, new).x)
    expected = torch.sigmoid(model(x)).item()
    assert np.isclose(result.probability[0], expected, atol=1e-6)

    runner = CliRunner()
    out = tmp_path / "pred.csv"
    ran = runner.invoke(app, ["predict", str(tmp_path / "model.pt"), "--data", str(new), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    assert "777" not in ran.output and "Xyzzy" not in ran.output  # refused rows named, values never shown
    lines = out.read_text().splitlines()
    assert lines[0] == "row,probability,class" and len(lines) == 4
    (tmp_path / "short.csv").write_text("age,sex\n50,Male\n")
    short = runner.invoke(app, ["predict", str(tmp_path / "model.pt"), "--data", str(tmp_path / "short.csv")])
    assert short.exit_code == BAD_INPUT and "missing columns" in short.output
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
