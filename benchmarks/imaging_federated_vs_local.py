"""Imaging: does the federation beat every site training alone, at the same DP budget and epochs?

For each seed (the initial model; DP noise and Poisson sampling are fresh in every run):

* federated: the `imaging-synthetic` study through the real simulation (simulations.runner.simulate:
  the real ServerApp and ClientApp, 4 sites, 5 rounds of `local_epochs` each);
* each site alone: client.training.train_round once, for rounds x local_epochs epochs, with the
  site's own DP plan for that (its epsilon and delta, the study's batch size: the same sampling
  rate and total steps it runs in the federation) and the study's optimiser settings.

The sites' local learning rate suits the federation, whose server also steps: a site alone may do
better with another. `--alone-learning-rates 1,2` trains each site alone with each of those too (and
reports each as its own row, e.g. "site-1 alone (lr 2)"), so the federation must beat every one.

Every model is evaluated on each site's own test set and on the pooled test set of all sites.
The headline metrics are the pooled balanced accuracy and ROC AUC: under label skew plain accuracy
rewards a model for predicting its own site's majority class, so it is shown but not used to judge.
DP noise makes single runs vary a lot (pooled balanced accuracy 0.5-0.8 for the same settings), so
besides the medians it counts, per seed, how often the federation beats each site alone.

    python -m benchmarks.imaging_federated_vs_local [--seeds 5] [--alone-learning-rates 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import median, print_table, write_results
from client.training import LocalTraining, predict, train_round
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import SiteSpec, StudyConfig, server_learning_rate, with_overrides
from pm_common.tasks import SiteTensors, task_of
from simulations.runner import check_sites, simulate
from simulations.scenarios import scenario_study

SCENARIO = "imaging-synthetic"
METRICS = ("balanced_accuracy", "auc", "accuracy")
POOLED = "pooled"
CPU = torch.device("cpu")


Scores = dict[str, dict[str, float]]  # test set -> metric -> value


def evaluate(model: nn.Module, study: StudyConfig, sites: dict[str, SiteTensors]) -> Scores:
    """The study's own metrics of `model` on each site's test set and on all of them pooled."""
    tests = {name: (data.test_x, data.test_y) for name, data in sites.items()}
    tests[POOLED] = (torch.cat([x for x, _ in tests.values()]), torch.cat([y for _, y in tests.values()]))
    task = task_of(study)
    return {
        name: {k: task.metrics(predict(model, x, CPU), y)[k] for k in METRICS}
        for name, (x, y) in tests.items()
    }


def federated(study: StudyConfig, out: Path) -> tuple[nn.Module, float, float]:
    """The federation's final model, the largest epsilon any site spent, and the run's wall time."""
    started = time.perf_counter()
    simulate(study, out, overwrite=True)
    wall = time.perf_counter() - started
    model = task_of(study).build_model(study)
    model.load_state_dict(torch.load(out / "model.pt")["state_dict"])
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    return model, max(s["epsilon"] for s in summary["sites"].values()), wall


def alone(
    study: StudyConfig, site: SiteSpec, data: SiteTensors, learning_rate: float | None = None
) -> tuple[nn.Module, float]:
    """One site's model trained on its own data only, with its whole budget and every epoch
    (at the study's learning rate unless `learning_rate` is given)."""
    training, task = study.training, task_of(study)
    epochs = study.rounds * training.local_epochs
    plan = plan_study(
        epsilon_budget=site.privacy.epsilon,
        delta=site.privacy.delta,
        num_examples=len(data.train_y),
        batch_size=training.batch_size,
        local_epochs=epochs,
        planned_rounds=1,
        max_grad_norm=training.max_grad_norm,
        accountant=site.privacy.accountant,
    )
    settings = LocalTraining(
        learning_rate=training.learning_rate if learning_rate is None else learning_rate,
        batch_size=training.batch_size,
        local_epochs=epochs,
        momentum=training.momentum,
        grad_sample_mode=training.grad_sample_mode,
        max_physical_batch_size=training.max_physical_batch_size,
    )
    model = task.build_model(study, study.seed)
    outcome = train_round(
        model,
        data.train_x,
        data.train_y,
        task.criterion(),
        settings,
        plan=plan,
        accountant_state={},
        device=CPU,
    )
    assert outcome.epsilon is not None and outcome.epsilon <= site.privacy.epsilon + 1e-9
    return model, outcome.epsilon


def run(seeds: int, work: Path, alone_rates: Sequence[float] = ()) -> dict[str, Any]:
    """Per seed: the federation and every site alone, each evaluated everywhere."""
    base = scenario_study(SCENARIO, work)
    sites = check_sites(base)
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        study = with_overrides(base, seed=seed)
        model, fed_eps, wall = federated(study, work / f"federated-{seed}")
        results = {"federated": {"epsilon": fed_eps, "wall_s": wall, **evaluate(model, study, sites)}}
        for site in study.sites:
            local, eps = alone(study, site, sites[site.name])
            results[f"{site.name} alone"] = {"epsilon": eps, **evaluate(local, study, sites)}
            for rate in alone_rates:
                local, eps = alone(study, site, sites[site.name], rate)
                results[f"{site.name} alone (lr {rate:g})"] = {
                    "epsilon": eps,
                    **evaluate(local, study, sites),
                }
        runs.append({"seed": seed, "results": results})
        fed = results["federated"][POOLED]
        print(
            f"seed {seed}: federated pooled balanced accuracy {fed['balanced_accuracy']:.3f}, "
            f"AUC {fed['auc']:.3f} ({wall:.0f} s)",
            flush=True,
        )
    return {"study": base, "sites": list(sites), "runs": runs}


def medians(runs: list[dict[str, Any]]) -> dict[str, Scores]:
    """Median over seeds of every (model, test set, metric)."""
    out: dict[str, Scores] = {}
    for model, first in runs[0]["results"].items():
        out[model] = {
            test: {m: median([r["results"][model][test][m] for r in runs]) for m in METRICS}
            for test, values in first.items()
            if isinstance(values, dict)
        }
    return out


def seed_wins(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per site alone and headline metric: in how many seeds the federation scored higher (pooled)."""
    fed = [r["results"]["federated"][POOLED] for r in runs]
    return {
        model: {
            m: sum(f[m] > r["results"][model][POOLED][m] for f, r in zip(fed, runs, strict=True))
            for m in ("balanced_accuracy", "auc")
        }
        for model in runs[0]["results"]
        if model != "federated"
    }


def main() -> None:
    """Compare the imaging federation with each site alone over seeds, print the table, write the results.

    Records the 1-minute load average before and after, since wall times depend on a shared machine's load.
    Writes benchmarks/results/imaging_federated_vs_local.json.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--alone-learning-rates", default="", help="more local learning rates for the sites alone, e.g. 2"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG notice: not a result
    torch.set_num_threads(1)  # as each simulated site: one thread
    load_before = os.getloadavg()[0]  # the machine may be shared: wall times depend on it
    with tempfile.TemporaryDirectory() as tmp:
        rates = [float(v) for v in args.alone_learning_rates.split(",") if v]
        outcome = run(args.seeds, Path(tmp), rates)
    load_after = os.getloadavg()[0]
    study: StudyConfig = outcome["study"]
    runs, names = outcome["runs"], outcome["sites"]
    table = medians(runs)
    fed = table["federated"][POOLED]
    rows = [
        [model, *[v[POOLED][m] for m in METRICS], *[v[s]["balanced_accuracy"] for s in names]]
        for model, v in table.items()
    ]
    print_table(
        f"{SCENARIO}: {len(names)} sites x {study.rounds} rounds x {study.training.local_epochs} "
        f"local epochs, epsilon {study.privacy.epsilon:g} per site, {args.seeds} seeds (medians)",
        ["model", "pooled bal. acc", "pooled AUC", "pooled acc", *[f"{s} bal. acc" for s in names]],
        rows,
    )
    beaten = {
        m: all(fed[m] > v[POOLED][m] for k, v in table.items() if k != "federated")
        for m in ("balanced_accuracy", "auc")
    }
    wins = seed_wins(runs)
    walls = [r["results"]["federated"]["wall_s"] for r in runs]
    print(f"federated beats every site alone on the pooled test set (medians): {beaten}")
    print(
        "seeds in which the federation beats the site alone (bal. acc, AUC): "
        + ", ".join(
            f"{model} {w['balanced_accuracy']}/{len(runs)}, {w['auc']}/{len(runs)}"
            for model, w in wins.items()
        )
    )
    print(
        f"simulation wall time median {median(walls):.1f} s (max {max(walls):.1f} s); "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after"
    )
    write_results(
        "imaging_federated_vs_local",
        {
            "scenario": SCENARIO,
            "seeds": args.seeds,
            "rounds": study.rounds,
            "local_epochs": study.training.local_epochs,
            "learning_rate": study.training.learning_rate,
            "alone_learning_rates": [study.training.learning_rate, *rates],
            "server_learning_rate": server_learning_rate(study.strategy),
            "server_momentum": study.strategy.server_momentum,
            "strategy": study.strategy.name,
            "epsilon": study.privacy.epsilon,
            "delta": study.privacy.delta,
            "grad_sample_mode": study.training.grad_sample_mode,
            "statistic": "median over seeds",
            "medians": table,
            "federated_beats_every_site_alone": beaten,
            "seeds_federated_beats_site_alone": wins,
            "simulation_wall_s": walls,
            "load_average_1min": {"before": load_before, "after": load_after},
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
