"""End to end: a federated DP study in Flower's Simulation Engine with the real apps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pm_common.models.tabular import build_tabular_model
from pm_common.records.ledger import read_ledger, round_entries
from pm_common.study.config import load_study
from simulations.runner import SimulationError, simulate
from tests.conftest import heart_study
from tests.test_privacy import dp_accounting_rdp


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("sim")
    sites = [dict(s) for s in load_study(heart_study(tmp)[0]).raw["sites"]]
    sites[2]["max_rounds"] = 2  # Switzerland accepts two rounds only: it must decline the third
    sites[3]["epsilon"] = 1.0  # VA Long Beach sets a tighter budget of its own
    _, study = heart_study(tmp, sites, study={"rounds": 3}, strategy={"name": "fedprox"})
    out = tmp / "run"
    return out, simulate(study, out)


def test_run_directory_holds_every_artifact(finished_run: tuple[Path, dict]) -> None:
    out, _ = finished_run
    for name in (
        "metrics.json",
        "model.pt",
        "config.toml",
        "privacy/summary.json",
        "checkpoints/round-0003.pt",
    ):
        assert (out / name).exists(), name
    assert load_study(out / "config.toml").rounds == 3
    saved = torch.load(out / "model.pt")
    model = build_tabular_model("logreg", saved["num_inputs"])
    model.load_state_dict(saved["state_dict"])  # plain keys, loadable as is


def test_metrics_per_round_and_site(finished_run: tuple[Path, dict]) -> None:
    _, metrics = finished_run
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    final = metrics["rounds"][-1]
    assert set(final["sites"]) == {"cleveland", "hungary", "switzerland", "va_long_beach"}
    for site in final["sites"].values():
        assert {"loss", "accuracy", "auc", "n"} <= set(site)
    accuracies = [s["accuracy"] for s in final["sites"].values()]
    assert final["mean_site_accuracy"] == pytest.approx(sum(accuracies) / 4)
    total = sum(s["n"] for s in final["sites"].values())
    pooled = sum(s["accuracy"] * s["n"] for s in final["sites"].values()) / total
    assert final["pooled_accuracy"] == pytest.approx(pooled)
    assert metrics["rounds"][3]["declined"] == {
        "switzerland": "round limit: the site accepts at most 2 rounds of training for this study"
    }
    assert sorted(metrics["rounds"][3]["trained"]) == ["cleveland", "hungary", "va_long_beach"]


def test_ledgers_recompute_independently_and_stay_within_budget(finished_run: tuple[Path, dict]) -> None:
    out, _ = finished_run
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    for site in ("cleveland", "hungary", "switzerland", "va_long_beach"):
        lines = read_ledger(out / "privacy" / f"ledger-{site}.jsonl")
        assert [e.status for e in lines][0::len(lines) - 1] == ["enrolled", "closed"]
        entries = round_entries(lines)
        assert [e.round for e in entries] == [1, 2, 3]
        history = []
        for entry in entries:
            if entry.steps:
                history.append((entry.noise_multiplier, entry.sample_rate, entry.steps))
            assert entry.epsilon == pytest.approx(dp_accounting_rdp(history, entry.delta), rel=1e-2)
            assert entry.epsilon <= entry.epsilon_budget
        assert summary["sites"][site]["epsilon"] == entries[-1].epsilon
    assert summary["sites"]["va_long_beach"]["epsilon_budget"] == 1.0
    assert summary["sites"]["switzerland"]["status"] == "declined"
    assert summary["sites"]["cleveland"]["status"] == "budget exhausted"  # planned for 3 rounds


def test_existing_run_is_not_overwritten_by_accident(finished_run: tuple[Path, dict]) -> None:
    out, _ = finished_run
    with pytest.raises(SimulationError, match="already holds a run"):
        simulate(load_study(out / "config.toml"), out)
