"""Prediction tasks beyond yes/no: their targets, refusals, losses, metrics and one run end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from pm_common.data.contract import ContractError, contract_from_dict
from pm_common.data.tabular import DataValidationError, NumberFormat, load_site_table
from pm_common.data.targets import ClassTarget, NumericTarget, SurvivalTarget
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import StudyConfigError, load_study, study_from_dict
from pm_common.tasks import evaluate_with_baseline, task_of
from pm_common.tasks.metrics import harrell_c_index
from pm_common.tasks.survival import DiscreteHazardLoss
from simulations.scenarios import scenario_path

FEATURES = [{"name": "age", "type": "numeric", "min": 0, "max": 100}]
SURVIVAL = {"time": "T", "event": "E", "event_values": [1], "censored_values": [0], "time_unit": "days",
            "intervals": [10, 20, 30]}


def contract(target: dict, **extra: object) -> dict:
    return {"target": target, "features": FEATURES, **extra}


def refusal(table: dict) -> str:
    with pytest.raises(ContractError) as info:
        contract_from_dict(table)
    return str(info.value)


def test_each_target_form_gives_its_task() -> None:
    multi = contract_from_dict(contract({"name": "stage", "classes": ["I", "II", "III"]}))
    assert multi.task == "multiclass-classification" and isinstance(multi.target, ClassTarget)
    dose = {"name": "dose", "type": "numeric", "min": 0, "max": 100, "unit": "mg"}
    reg = contract_from_dict(contract(dose))
    assert reg.task == "regression" and isinstance(reg.target, NumericTarget)
    surv = contract_from_dict(contract(SURVIVAL))
    assert surv.task == "survival" and isinstance(surv.target, SurvivalTarget)
    assert surv.target.horizons == (10.0, 20.0, 30.0)  # default: the interval ends
    assert surv.expected_columns == ["age", "T", "E"]
    binary = contract_from_dict(contract({"name": "y", "positive": [1], "negative": [0]}))
    assert binary.task == "binary-classification"


def test_malformed_targets_are_refused_naming_the_key_and_what_is_allowed() -> None:
    assert "[contract.target]: matches no target form; allowed:" in refusal(contract({"name": "x"}))
    text = refusal(contract({"name": "s", "classes": [1, "1.0"]}))
    assert "[contract.target].classes" in text
    text = refusal(contract({"name": "d", "type": "numeric", "min": 5, "max": 1}))
    assert "[contract.target].min: min must be below max" in text
    text = refusal(contract({**SURVIVAL, "intervals": [10, 5]}))
    assert "[contract.target].intervals" in text and "strictly increasing" in text
    text = refusal(contract({**SURVIVAL, "censored_values": [1]}))
    assert "event_values and censored_values must be disjoint" in text
    text = refusal(contract(SURVIVAL, task="regression"))
    assert "[contract].task: 'regression' does not match the target's form" in text


def test_study_task_is_inferred_from_the_target_and_a_contradiction_refused(tmp_path: Path) -> None:
    raw = copy.deepcopy(dict(load_study(scenario_path("heart-disease-severity")).raw))
    assert study_from_dict(raw, tmp_path).task == "multiclass-classification"
    raw["study"]["task"] = "regression"
    with pytest.raises(StudyConfigError, match=r"\[study\].task: 'regression' does not match"):
        study_from_dict(raw, tmp_path)


@pytest.mark.parametrize(("target", "rows", "expected"), [
    (SURVIVAL, "age,T,E\n50,5,1\n50,-77,0\n", "column 'T': 1 row not above 0; allowed: a survival time > 0 "
     "days (data row 2; data row N is line N+1 of the file)"),
    (SURVIVAL, "age,T,E\n50,,1\n", "column 'T': 1 row missing; allowed: a survival time > 0 days "
     "(data row 1;"),
    (SURVIVAL, "age,T,E\n50,5,1\n50,6,9177\n", "column 'E': 1 row not a declared event code; allowed: "
     "event_values ['1'], censored_values ['0'] (data row 2;"),
    ({"name": "stage", "classes": ["I", "II"]}, "age,stage\n50,I\n50,X9177\n50,X9177\n",
     "column 'stage': 2 rows not a declared class; allowed: ['I', 'II'] (data rows 2, 3;"),
    ({"name": "dose", "type": "numeric", "min": 0, "max": 100, "unit": "mg"}, "age,dose\n50,9177\n",
     "column 'dose': 1 row outside the declared range; allowed: a number in [0, 100] mg (data row 1;"),
])
def test_bad_target_cells_are_refused_without_their_value(tmp_path: Path, target: dict, rows: str,
                                                          expected: str) -> None:
    path = tmp_path / "site.csv"
    path.write_text(rows)
    with pytest.raises(DataValidationError) as info:
        load_site_table(path, contract_from_dict(contract(target)))
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "9177" not in message and "-77" not in message  # the cell's value never appears


def test_target_numbers_are_read_in_the_sites_own_format(tmp_path: Path) -> None:
    """A site exporting `1.234,5` declares thousands "." and decimal ",": its survival times and doses
    are read as 1234.5, never misread as 1.2345; a cell in another format is refused, not guessed."""
    path = tmp_path / "site.csv"
    path.write_text("age;T;E\n50;1.234,5;1\n60;7;0\n")
    european = NumberFormat(thousands=".", decimal=",")
    survival = contract_from_dict(contract(SURVIVAL))
    data = load_site_table(path, survival, delimiter=";", number_format=european)
    assert data.y[:, 0].tolist() == [1234.5, 7.0]
    dose = {"name": "dose", "type": "numeric", "min": 0, "max": 2000, "unit": "mg"}
    path.write_text("age;dose\n50;1.234,5\n60;2,65.0\n")
    with pytest.raises(DataValidationError) as info:
        load_site_table(path, contract_from_dict(contract(dose)), delimiter=";", number_format=european)
    assert "column 'dose': 1 row not a number" in str(info.value) and "(data row 2;" in str(info.value)
    path.write_text("age;dose\n50;1.234,5\n")
    doses = contract_from_dict(contract(dose))
    scaled = load_site_table(path, doses, delimiter=";", number_format=european).y
    assert NumericTarget("dose", 0, 2000).unscale(scaled).tolist() == pytest.approx([1234.5])


def test_class_codes_match_whatever_their_spelling(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("age,stage\n50,1.0\n50,2\n50,3.0\n")
    data = load_site_table(path, contract_from_dict(contract({"name": "stage", "classes": [1, 2, 3]})))
    assert data.y.tolist() == [0, 1, 2]


def test_survival_loss_is_the_hazard_likelihood() -> None:
    loss = DiscreteHazardLoss((10.0, 20.0, 30.0))
    logits = torch.tensor([[0.3, -0.2, 0.5]] * 3)
    h = torch.sigmoid(logits[0])
    # event at 15 (interval 2): survived interval 1, event in 2; censored at 25: survived 1 and 2;
    # event at 45, past the grid: censored at its end, survived all three
    y = torch.tensor([[15.0, 1.0], [25.0, 0.0], [45.0, 1.0]])
    expected = [-(torch.log(1 - h[0]) + torch.log(h[1])), -(torch.log(1 - h[:2]).sum()),
                -(torch.log(1 - h).sum())]
    assert torch.allclose(loss.per_patient(logits, y), torch.stack(expected), atol=1e-6)


def _cox_partial_likelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Breslow's batch Cox loss: each event's risk set is the rest of the batch (what DP-SGD cannot use)."""
    risk, time, event = logits[:, 0], y[:, 0], y[:, 1]
    at_risk = (time[None, :] >= time[:, None]).float()
    log_denominator = torch.log((at_risk * torch.exp(risk)[None, :]).sum(1))
    return -((risk - log_denominator) * event).sum() / len(y)


def _first_patient_gradient(loss_fn, batch_x: torch.Tensor, batch_y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = GradSampleModule(build_tabular_model("mlp", 4, (8,), seed=0, num_outputs=3))
    loss_fn(model(batch_x), batch_y).backward()
    return torch.cat([p.grad_sample[0].flatten() for p in model.parameters()])


def test_one_patients_gradient_does_not_depend_on_the_rest_of_the_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    patient_x, patient_y = torch.randn(1, 4, generator=generator), torch.tensor([[12.0, 1.0]])
    y_a = torch.tensor([[5.0, 1], [15, 0], [22, 1], [28, 1], [40, 0]])
    y_b = torch.tensor([[3.0, 0], [13, 1], [18, 1], [35, 1], [8, 1]])
    rest_a = (torch.randn(5, 4, generator=generator), y_a)
    rest_b = (torch.randn(5, 4, generator=generator), y_b)
    batches = [(torch.cat([patient_x, x]), torch.cat([patient_y, y])) for x, y in (rest_a, rest_b)]
    hazard = DiscreteHazardLoss((10.0, 20.0, 30.0))
    a, b = (_first_patient_gradient(hazard, x, y) for x, y in batches)
    assert torch.allclose(a, b, atol=1e-6) and a.abs().sum() > 0
    # the check can fail: under a batch Cox loss the same patient's gradient moves with the batch
    a, b = (_first_patient_gradient(_cox_partial_likelihood, x, y) for x, y in batches)
    assert not torch.allclose(a, b, atol=1e-3)


def test_harrell_c_index_counts_concordant_pairs() -> None:
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 0, 1])
    # comparable pairs (earlier one an event): (1,2) (1,3) (1,4) concordant, (2,3) discordant, (2,4) tied
    risk = np.array([0.9, 0.5, 0.7, 0.5])
    assert harrell_c_index(risk, time, event) == pytest.approx(3.5 / 5)
    assert harrell_c_index(np.ones(4), time, event) == 0.5
    assert harrell_c_index(risk, time, np.zeros(4)) is None


def test_a_model_no_better_than_the_majority_class_is_flagged() -> None:
    study = load_study(scenario_path("heart-disease-severity"))
    task = task_of(study)
    train_y, test_y = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 0, 1, 2, 3])
    majority = torch.zeros(5, 5)
    majority[:, 0] = 5.0
    flagged = evaluate_with_baseline(task, majority, train_y, test_y)
    assert flagged["no_better_than_baseline"] == 1.0 and flagged["baseline"] == flagged["balanced_accuracy"]
    perfect = torch.nn.functional.one_hot(test_y, 5).float() * 5
    assert evaluate_with_baseline(task, perfect, train_y, test_y)["no_better_than_baseline"] == 0.0


def test_survival_study_simulates_and_audits_clean(tmp_path: Path) -> None:
    from pm_common.audit.directories import audit_directory
    from simulations.runner import simulate

    raw = copy.deepcopy(dict(load_study(scenario_path("tcga-brca")).raw))
    raw["sites"] = raw["sites"][:2]
    raw["study"]["rounds"] = 2
    metrics = simulate(study_from_dict(raw, tmp_path), tmp_path / "run")
    final = metrics["rounds"][-1]
    assert metrics["task"] == "survival" and final["metric"] == "c_index"
    for site in ("region_0", "region_1"):
        m = final["sites"][site]
        assert {"c_index", "integrated_brier", "n", "baseline"} <= set(m)
        assert isinstance(m["no_better_than_baseline"], bool)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["metrics_shown"] == ["c_index", "integrated_brier"]
    assert audit_directory(tmp_path / "run").exit_code == 0


def test_discrete_cox_shares_one_slope_and_keeps_gradients_per_patient() -> None:
    model = build_tabular_model("discrete-cox", 4, seed=0, num_outputs=3)
    assert sum(p.numel() for p in model.parameters()) == 4 + 3  # one slope, one baseline per interval
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    logits = model(x)
    # proportional hazards: the logits of two patients differ by the same amount in every interval
    gaps = logits[0] - logits[1]
    assert torch.allclose(gaps, gaps[0].expand(3), atol=1e-6)
    hazard = DiscreteHazardLoss((10.0, 20.0, 30.0))
    y_a = torch.tensor([[12.0, 1], [5, 1], [15, 0], [22, 1], [28, 1], [40, 0]])
    y_b = torch.tensor([[12.0, 1], [3, 0], [13, 1], [18, 1], [35, 1], [8, 1]])
    grads = []
    for y in (y_a, y_b):
        wrapped = GradSampleModule(build_tabular_model("discrete-cox", 4, seed=0, num_outputs=3))
        hazard(wrapped(x), y).backward()
        grads.append(torch.cat([p.grad_sample[0].flatten() for p in wrapped.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
