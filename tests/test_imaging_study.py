"""Imaging study settings: balanced accuracy, the "auto" grad-sample mode and where a run records it."""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from client.training import LocalTraining, train_round
from pm_common.models.tabular import build_tabular_model, resolve_grad_sample_mode
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import StudyConfig, StudyConfigError, study_from_dict, with_overrides
from pm_common.tasks import task_of
from pm_common.tasks.images import multiclass_metrics
from pm_common.tasks.metrics import balanced_accuracy
from server.recorder import RunRecorder
from simulations.scenarios import scenario_path


def _imaging_study(**training: object) -> StudyConfig:
    """The imaging-synthetic scenario's study without its generated sites (no data needed)."""
    raw = tomllib.loads(scenario_path("imaging-synthetic").read_text(encoding="utf-8"))
    raw.pop("synthetic")
    raw["training"].update(training)
    return study_from_dict(raw, Path("."))


def test_balanced_accuracy_scores_a_majority_class_guess_as_chance() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    always_normal = torch.zeros(8, dtype=torch.long)
    assert float((always_normal == labels).float().mean()) == 0.75
    assert balanced_accuracy(always_normal, labels) == 0.5
    one_lesion_found = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0])  # recalls 5/6 and 1/2
    assert balanced_accuracy(one_lesion_found, labels) == pytest.approx((5 / 6 + 1 / 2) / 2)
    generator = torch.Generator().manual_seed(0)
    labels, predicted = torch.randint(0, 3, (200,), generator=generator), torch.randint(0, 3, (200,))
    assert balanced_accuracy(predicted, labels) == pytest.approx(balanced_accuracy_score(labels, predicted))


def test_sites_report_balanced_accuracy_of_their_predictions() -> None:
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [3.0, 0.0]])
    metrics = multiclass_metrics(logits, torch.tensor([0, 0, 1, 1]))
    assert metrics["accuracy"] == 0.75 and metrics["balanced_accuracy"] == 0.75 and metrics["n"] == 4


def test_auto_grad_sample_mode_resolves_per_model_and_an_explicit_mode_is_kept() -> None:
    study = _imaging_study()
    assert study.raw["training"]["grad_sample_mode"] == "auto"
    assert study.training.grad_sample_mode == "hooks"  # small-cnn
    # The effective config keeps "auto", so another model resolves to its own mode.
    assert with_overrides(study, model="densenet121").training.grad_sample_mode == "ghost"
    assert _imaging_study(grad_sample_mode="functorch").training.grad_sample_mode == "functorch"
    with pytest.raises(StudyConfigError, match=r"\[training\]\.grad_sample_mode: got \"fast\""):
        _imaging_study(grad_sample_mode="fast")


def test_the_resolved_mode_is_in_the_runs_metrics_and_model_file(tmp_path: Path) -> None:
    study = _imaging_study()
    meta = task_of(study).describe_model(study)
    assert meta["grad_sample_mode"] == "hooks"
    recorder = RunRecorder(tmp_path, study, meta)
    recorder.write_metrics()
    assert json.loads((tmp_path / "metrics.json").read_text())["grad_sample_mode"] == "hooks"
    assert "grad_sample_mode = \"auto\"" in (tmp_path / "config.toml").read_text()


@pytest.mark.parametrize("model_name", ["small-cnn", "mlp"])
def test_the_auto_mode_trains_through_empty_poisson_batches(model_name: str) -> None:
    """Expected batch size 1 over 12 records: about a third of Poisson batches are empty."""
    if model_name == "small-cnn":
        study = with_overrides(_imaging_study(), model=model_name)
        mode = study.training.grad_sample_mode
        model, x = task_of(study).build_model(study), torch.rand(12, 1, 64, 64)
        y, criterion = torch.randint(0, 2, (12,)), torch.nn.CrossEntropyLoss()
    else:  # a tabular model: an imaging study refuses it ([model].name), so its mode is resolved directly
        mode = resolve_grad_sample_mode("auto", model_name)
        model, x = build_tabular_model("mlp", 5), torch.rand(12, 5)
        y, criterion = torch.randint(0, 2, (12,)).float(), torch.nn.BCEWithLogitsLoss()
    plan = plan_study(epsilon_budget=8.0, delta=1e-5, num_examples=12, batch_size=1, local_epochs=1,
                      planned_rounds=1, max_grad_norm=1.0)
    settings = LocalTraining(0.1, 1, 1, grad_sample_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = train_round(model, x, y, criterion, settings, plan=plan, accountant_state={}, seed=3,
                              device=torch.device("cpu"))
    assert outcome.steps == 12 and 0 < outcome.epsilon <= 8.0
