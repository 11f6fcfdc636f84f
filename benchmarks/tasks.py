"""Each new task's built-in scenario under DP (epsilon 3 per site) against a pooled non-private baseline.

    python -m benchmarks.tasks [--seeds 0] [--rounds N] [--scenario NAME ...]

Federated: `pmfl simulate NAME` as shipped (DP-SGD, epsilon 3, delta 1e-5 at every site), its final
model evaluated on all sites' test rows together (for tcga-brca: FLamby's pooled test set). Pooled:
the same model trained without DP on all sites' training rows together (plain SGD, same learning rate
and batch size, as many epochs as the federation's rounds), evaluated on the same pooled test rows.
Prints a table and writes benchmarks/results/tasks.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, write_results
from client.training import LocalTraining, predict, train_round
from pm_common.study.config import StudyConfig, study_from_dict
from pm_common.tasks import task_of
from simulations.runner import simulate
from simulations.scenarios import scenario_study

SCENARIOS = ("heart-disease-severity", "diabetes-progression", "tcga-brca")
HEADLINE = {"heart-disease-severity": "balanced_accuracy", "diabetes-progression": "r2",
            "tcga-brca": "c_index"}


def pooled_rows(study: StudyConfig) -> tuple[torch.Tensor, ...]:
    """All sites' train and test rows, each site split as it would split its own."""
    task = task_of(study)
    parts = [task.load_site(spec, study) for spec in study.sites]
    keys = ("train_x", "train_y", "test_x", "test_y")
    return tuple(torch.cat([getattr(p, k) for p in parts]) for k in keys)


def federated(study: StudyConfig, seed: int, rounds: int | None) -> tuple[dict[str, float], float]:
    """The shipped scenario under DP; metrics of its final model on the pooled test rows."""
    raw = copy.deepcopy(dict(study.raw))
    raw["study"]["seed"] = seed
    if rounds:
        raw["study"]["rounds"] = rounds
    run_study = study_from_dict(raw, Path("."))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        simulate(run_study, Path(tmp) / "run")
        wall = time.perf_counter() - start
        saved = torch.load(Path(tmp) / "run" / "model.pt", weights_only=False)
    task = task_of(run_study)
    model = task.build_model(run_study)
    model.load_state_dict(saved["state_dict"])
    _, _, test_x, test_y = pooled_rows(run_study)
    return task.metrics(predict(model, test_x), test_y), wall


def pooled_non_private(study: StudyConfig, seed: int, epochs: int) -> dict[str, float]:
    """The same model trained centrally on every site's training rows, no DP."""
    task = task_of(study)
    train_x, train_y, test_x, test_y = pooled_rows(study)
    model = task.build_model(study, seed=seed)
    t = study.training
    settings = LocalTraining(t.learning_rate, t.batch_size, epochs, t.momentum)
    train_round(model, train_x, train_y, task.criterion(), settings, plan=None, accountant_state={},
                seed=seed, device=torch.device("cpu"))
    return task.metrics(predict(model, test_x, torch.device("cpu")), test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=None, help="replace each scenario's rounds")
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    rows = []
    for name in args.scenario:
        study = scenario_study(name, Path(tempfile.gettempdir()))
        metric = HEADLINE[name]
        for seed in args.seeds:
            fed, wall = federated(study, seed, args.rounds)
            pooled = pooled_non_private(study, seed, args.rounds or study.rounds)
            results.setdefault(name, []).append({"seed": seed, "federated_dp_eps3": fed, "wall_s": wall,
                                                 "pooled_non_private": pooled, "metric": metric})
            rows.append([name, seed, metric, fed.get(metric), pooled.get(metric),
                         fed.get(metric, float("nan")) - pooled.get(metric, float("nan")), f"{wall:.0f}"])
    print_table("New tasks: federated DP (eps 3 per site) vs pooled non-private, pooled test rows",
                ["scenario", "seed", "metric", "federated DP", "pooled no DP", "difference", "wall s"], rows)
    write_results("tasks", {"command": "python -m benchmarks.tasks", "seeds": args.seeds,
                            "results": results,
                            "flamby_tcga_brca_c_index_non_private": {
                                "pooled": 0.704, "fedavg": 0.735, "fedadam": 0.842,
                                "best_region_alone": 0.728}})


if __name__ == "__main__":
    main()
