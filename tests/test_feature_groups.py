"""Omics-scale inputs (issue #15, item 2): `[[contract.feature_groups]]` declare many columns at once."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client.training import LocalTraining, train_round
from pm_common.data.contract import ContractError, contract_from_dict
from pm_common.data.tabular import DataValidationError, load_site_table
from pm_common.models.tabular import build_tabular_model
from pm_common.privacy.accountant import plan_study

TARGET = {"name": "y", "positive": [1], "negative": [0]}


def _contract(**group: object) -> dict:
    return {"target": TARGET, "features": [{"name": "age", "type": "numeric", "min": 0, "max": 120}],
            "feature_groups": [{"name": "expr", "type": "numeric", "min": 0, "max": 1e5, **group}]}


def test_a_list_or_a_prefix_and_range_name_the_inputs_without_data() -> None:
    listed = contract_from_dict(_contract(columns=["TP53", "BRCA1", "EGFR"]))
    assert listed.encoded_names() == ["age", "TP53", "BRCA1", "EGFR", "age:missing", "TP53:missing",
                                      "BRCA1:missing", "EGFR:missing"]
    ranged = contract_from_dict(_contract(prefix="GENE_", range=[1, 12], digits=3, missing="error"))
    assert ranged.encoded_names()[1:3] == ["GENE_001", "GENE_002"] and ranged.num_inputs == 1 + 12 + 1
    checked = contract_from_dict(_contract(prefix="GENE_", range=[1, 3], glob="GENE_*"))
    assert checked.num_inputs == 1 + 3 + 4


def test_a_glob_alone_is_refused_with_the_reason() -> None:
    with pytest.raises(ContractError) as info:
        contract_from_dict(_contract(glob="GENE_*"))
    assert str(info.value).startswith("[[contract.feature_groups]] 'expr'.glob: a glob alone cannot name the "
                                      "model's inputs: the coordinator builds the model from the study")
    with pytest.raises(ContractError, match=r"'expr'.glob: 1 listed column\(s\) do not match 'GENE_\*'"):
        contract_from_dict(_contract(columns=["GENE_1", "TP53"], glob="GENE_*"))
    with pytest.raises(ContractError, match=r"'expr'.count: 3 declared, 2 columns named"):
        contract_from_dict(_contract(columns=["A", "B"], count=3))
    with pytest.raises(ContractError, match=r"duplicate names \['age'\]"):
        contract_from_dict(_contract(columns=["age", "B"]))
    with pytest.raises(ContractError, match=r"'expr'.min: got -2; transform = \"log1p\" needs min > -1"):
        contract_from_dict({**_contract(columns=["A"], transform="log1p"),
                            "feature_groups": [{"name": "expr", "columns": ["A"], "type": "numeric",
                                                "min": -2, "max": 5, "transform": "log1p"}]})


def test_groups_cannot_expand_without_bound() -> None:
    huge = {"type": "numeric", "min": 0, "max": 1, "prefix": "G", "range": [1, 40_000]}
    with pytest.raises(ContractError, match=r"more than 50000 columns in all"):
        contract_from_dict({"target": TARGET, "feature_groups": [huge] * 1000})
    with pytest.raises(ContractError, match=r"'expr'.range: got \[1, 1000000000\]; expected"):
        contract_from_dict(_contract(prefix="G", range=[1, 10**9]))


def test_log1p_maps_the_declared_range_onto_minus_one_to_one(tmp_path: Path) -> None:
    contract = contract_from_dict(_contract(columns=["A", "B"], transform="log1p", missing="impute"))
    path = tmp_path / "site.csv"
    path.write_text("age,A,B,y\n60,0,100000,1\n60,316.2,NA,0\n", encoding="utf-8")
    data = load_site_table(path, contract)
    names = contract.encoded_names()
    a, b = names.index("A"), names.index("B")
    assert data.x[0, a] == pytest.approx(-1) and data.x[0, b] == pytest.approx(1)
    expected = (math.log1p(316.2) - math.log1p(1e5) / 2) / (math.log1p(1e5) / 2)
    assert data.x[1, a] == pytest.approx(expected, abs=1e-6)
    indicator = names.index("B:missing")
    assert data.x[1, b] == 0 and data.x[1, indicator] == 1 and data.x[0, indicator] == 0


def test_missing_indicators_only_for_columns_that_can_be_missing(tmp_path: Path) -> None:
    """`missing = "error"` genes get no indicator input; a missing cell in one is refused."""
    contract = contract_from_dict(_contract(columns=["A", "B"], missing="error"))
    assert contract.encoded_names() == ["age", "A", "B", "age:missing"]
    path = tmp_path / "site.csv"
    path.write_text("age,A,B,y\n,1,2,1\n50,,2,0\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_site_table(path, contract)
    assert info.value.problems[0].describe(path) == (
        f"{path}, column 'A': 1 row missing (the column's missing policy is 'error') (data row 2; data row N "
        "is line N+1 of the file)")
    assert len(info.value.problems) == 1  # age may be missing: imputed, with its indicator
    dropped = contract_from_dict(_contract(columns=["A", "B"], missing="drop"))
    assert dropped.encoded_names() == ["age", "A", "B", "age:missing"]
    assert len(load_site_table(path, dropped)) == 1


def test_five_thousand_gene_columns_validate_and_encode_quickly(tmp_path: Path) -> None:
    genes = 5000
    contract = contract_from_dict({"target": TARGET, "missing": "error", "feature_groups": [
        {"name": "expression", "prefix": "GENE_", "range": [1, genes], "type": "numeric", "min": 0,
         "max": 1e5, "transform": "log1p"}]})
    assert contract.num_inputs == genes
    rng = np.random.default_rng(0)
    values = np.round(rng.lognormal(3, 2, size=(20, genes)).clip(0, 1e5), 2)
    header = ",".join(f"GENE_{i}" for i in range(1, genes + 1)) + ",y"
    lines = [",".join(map(str, row)) + f",{i % 2}" for i, row in enumerate(values)]
    path = tmp_path / "omics.csv"
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    start = time.perf_counter()
    data = load_site_table(path, contract)
    elapsed = time.perf_counter() - start
    assert data.x.shape == (20, genes) and np.abs(data.x).max() <= 1.0
    assert np.corrcoef(data.x[:, 7], np.log1p(values[:, 7]))[0, 1] > 0.999
    assert elapsed < 10, elapsed  # measured ~0.3 s here; the bound only catches a per-cell Python loop
    model = build_tabular_model("logreg", contract.num_inputs, (32,), 0)
    assert sum(p.numel() for p in model.parameters()) == genes + 1
    plan = plan_study(epsilon_budget=3.0, delta=1e-5, num_examples=len(data), batch_size=5, local_epochs=1,
                      planned_rounds=1, max_grad_norm=1.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outcome = train_round(model, torch.from_numpy(data.x), torch.from_numpy(data.y),
                          torch.nn.BCEWithLogitsLoss(), LocalTraining(0.5, 5, 1), plan=plan,
                          accountant_state={}, seed=0)
    assert outcome.accountant["history"] and outcome.epsilon is not None  # DP-SGD ran and was accounted
    assert any(not torch.equal(outcome.state_dict[k].cpu(), v) for k, v in before.items())
