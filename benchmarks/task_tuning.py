"""Choose each new task scenario's shipped settings on validation rows carved from the sites' TRAINING rows.

    python -m benchmarks.task_tuning --scenario tcga-brca [--seeds 0 1 2] [--val-seed 7]

Why a procedure of its own: a setting picked by its score on the test rows would make that score
optimistic. Here every site splits its own training rows once (stratified by class, or by event for
survival; 25 % validation, fixed `--val-seed`); a candidate federation trains under DP-SGD (the
study's epsilon 3 and delta 1e-5 per site, the sites' real Opacus training step `train_round`,
the privacy plan a site fixes, `plan_study`, for its inner training rows) and is scored on all sites'
validation rows together; the candidate with the best median over seeds wins. The test rows are never
used here (each site's loader returns them; they are dropped unread). The federation is simulated in
this process (FedAvg weighted by rows, or FedAdam as Flower 1.42's `FedAdam.aggregate_train` computes
it) because Flower's engine costs seconds per round;
the chosen settings are then measured through `pmfl simulate --seeds` (benchmarks/tasks.py).

The pooled non-private baseline's optimiser settings (Adam learning rate, weight decay, epochs) are
chosen the same way, on a validation split of the pooled training rows (benchmarks/tasks.py,
`choose_pooled_settings`, with `split_rows` from here).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.training import LocalTraining, predict, train_round
from pm_common.models.tabular import plain_state_dict
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import StudyConfig, study_from_dict
from pm_common.tasks import task_of
from simulations.scenarios import scenario_path, scenario_study

VAL_FRACTION = 0.25
RESULTS = Path(__file__).parent / "results"


def with_settings(study: StudyConfig, name: str, settings: Mapping[str, Any]) -> StudyConfig:
    """The scenario's study with `settings` ({"section.key": value}) replaced."""
    raw = copy.deepcopy(dict(study.raw))
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        if section == "target":
            raw["contract"]["target"][key] = value
        else:
            raw.setdefault(section, {})[key] = value
    return study_from_dict(raw, scenario_path(name).parent)


def _strata(y: torch.Tensor) -> np.ndarray:
    if y.ndim == 2:  # survival: (time, event)
        return y[:, 1].numpy().astype(int)
    if y.dtype == torch.long:
        return y.numpy()
    return np.zeros(len(y), dtype=int)


def split_rows(x: torch.Tensor, y: torch.Tensor, seed: int, fraction: float = VAL_FRACTION) -> tuple:
    """(train_x, train_y, val_x, val_y): `fraction` of each stratum held out, at least one row of a
    stratum with two or more."""
    rng = np.random.default_rng(seed)
    strata = _strata(y)
    val: list[int] = []
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        rng.shuffle(rows)
        take = round(len(rows) * fraction) if len(rows) > 1 else 0
        val.extend(rows[:max(take, 1 if len(rows) > 1 else 0)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[val] = True
    keep = torch.from_numpy(~mask)
    held = torch.from_numpy(mask)
    return x[keep], y[keep], x[held], y[held]


def training_splits(study: StudyConfig, seed: int) -> list[tuple[str, torch.Tensor, ...]]:
    """Each site's training rows split into inner-train and validation; its test rows are dropped unread."""
    task = task_of(study)
    splits = []
    for spec in study.sites:
        data = task.load_site(spec, study)
        splits.append((spec.name, *split_rows(data.train_x, data.train_y, seed)))
    return splits


def federate(study: StudyConfig, sites: list[tuple], seed: int) -> torch.nn.Module:
    """Train the study's model federatedly under each site's DP plan; return the final global model.

    Args:
        study: the study (model, training, strategy, privacy, rounds).
        sites: (name, train_x, train_y, ...) per site.
        seed: the initial model's seed and the sites' sampling/noise seeds.
    """
    task = task_of(study)
    t, s, p = study.training, study.strategy, study.privacy
    model = task.build_model(study, seed=seed)
    current = {k: v.detach().double().clone() for k, v in plain_state_dict(model).items()}
    settings = LocalTraining(t.learning_rate, t.batch_size, t.local_epochs, t.momentum,
                             proximal_mu=s.proximal_mu if s.name == "fedprox" else 0.0,
                             grad_sample_mode="hooks")
    plans = [plan_study(epsilon_budget=p.epsilon, delta=p.delta, num_examples=len(site[2]),
                        batch_size=t.batch_size, local_epochs=t.local_epochs, planned_rounds=study.rounds,
                        max_grad_norm=t.max_grad_norm, accountant=p.accountant) if p.dp else None
             for site in sites]
    accountants: list[dict] = [{} for _ in sites]
    m_t: dict[str, torch.Tensor] = {}
    v_t: dict[str, torch.Tensor] = {}
    eta = s.server_learning_rate if s.server_learning_rate is not None else 0.1
    for server_round in range(1, study.rounds + 1):
        total, summed = 0, {k: torch.zeros_like(v) for k, v in current.items()}
        for i, (_, x, y, *_rest) in enumerate(sites):
            local = task.build_model(study, seed=seed)
            local.load_state_dict({k: v.float() for k, v in current.items()})
            out = train_round(local, x, y, task.criterion(), settings, plan=plans[i],
                              accountant_state=accountants[i], seed=seed * 100_003 + server_round * 101 + i,
                              device=torch.device("cpu"))
            accountants[i] = out.accountant
            for k, v in out.state_dict.items():
                summed[k] += v.double() * len(y)
            total += len(y)
        averaged = {k: v / total for k, v in summed.items()}
        if s.name in ("fedavg", "fedprox"):
            current = averaged
        elif s.name == "fedadam":  # Flower 1.42 FedAdam.aggregate_train
            delta = {k: averaged[k] - current[k] for k in current}
            m_t = {k: 0.9 * m_t.get(k, torch.zeros_like(d)) + 0.1 * d for k, d in delta.items()}
            v_t = {k: 0.99 * v_t.get(k, torch.zeros_like(d)) + 0.01 * d**2 for k, d in delta.items()}
            eta_norm = eta * np.sqrt(1 - 0.99 ** (server_round + 1.0)) / (1 - 0.9 ** (server_round + 1.0))
            current = {k: current[k] + eta_norm * m_t[k] / (v_t[k].sqrt() + s.tau) for k in current}
        else:
            raise ValueError(f"strategy {s.name} is not simulated here")
    model.load_state_dict({k: v.float() for k, v in current.items()})
    return model


def validation_score(study: StudyConfig, sites: list[tuple], model: torch.nn.Module) -> dict[str, float]:
    """Score a candidate's final model on all sites' validation rows together.

    The candidates are compared on one score for the whole federation, computed on the held-out part of
    the training rows, never on the test rows.

    Args:
        study: the candidate's study (its task gives the metrics).
        sites: (name, train_x, train_y, val_x, val_y) per site, as `training_splits` returns.
        model: the federation's final model.

    Returns:
        The task's metrics on the pooled validation rows.
    """
    task = task_of(study)
    val_x = torch.cat([site[3] for site in sites])
    val_y = torch.cat([site[4] for site in sites])
    return task.metrics(predict(model, val_x, torch.device("cpu")), val_y)


def grid(space: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """Every combination of the candidate values: the settings the tuning tries.

    Args:
        space: candidate values per "section.key" setting.

    Returns:
        One {"section.key": value} mapping per combination.
    """
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


SPACES: dict[str, dict[str, list[Any]]] = {
    # Several settings are tied together by the DP budget: more rounds or epochs mean more noise per
    # step, a larger batch less noise per averaged gradient but fewer steps.
    "tcga-brca": {
        "model.name": ["logreg"],
        "strategy.name": ["fedavg", "fedadam"],
        "strategy.server_learning_rate": [0.03, 0.1],
        "training.learning_rate": [0.1, 0.5, 1.0],
        "training.batch_size": [16, 32],
        "study.rounds": [10, 20],
        "target.intervals": [[365, 730, 1095, 1460, 1825, 2555, 3650], [730, 1825, 3650]],
    },
}


def tune(name: str, space: Mapping[str, Iterable[Any]], seeds: list[int], val_seed: int) -> dict[str, Any]:
    """Train and score every candidate of `space` for a scenario; rank them by their median over seeds.

    Each site's training rows are split once, and every candidate meets the same validation rows. FedAvg
    and FedProx ignore the server learning rate, so only their candidates with its first value run.
    Each candidate is printed as a JSON line when done.

    Args:
        name: the scenario.
        space: candidate values per "section.key" setting.
        seeds: the seeds each candidate trains with.
        val_seed: the seed of the training/validation split.

    Returns:
        The scenario, its headline metric, the split and DP settings used, the best candidate and every
        candidate (settings, scores per seed, median, seconds), best first.
    """
    base = scenario_study(name, Path("."))
    task = task_of(base)
    candidates = grid(space)
    rows = []
    splits = None
    for settings in candidates:
        if settings.get("strategy.name") in ("fedavg", "fedprox") and settings.get(
                "strategy.server_learning_rate", 0.1) != space.get("strategy.server_learning_rate", [0.1])[0]:
            continue  # FedAvg ignores the server learning rate: one candidate is enough
        study = with_settings(base, name, settings)
        if splits is None:
            splits = training_splits(study, val_seed)
        start = time.perf_counter()
        scores = [validation_score(study, splits, federate(study, splits, seed)).get(
            task.headline, float("nan")) for seed in seeds]
        row = {"settings": settings, "scores": scores, "median": statistics.median(scores),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: -r["median"] if task.higher_is_better else r["median"])
    return {"scenario": name, "metric": task.headline, "val_fraction": VAL_FRACTION, "val_seed": val_seed,
            "seeds": seeds, "dp": {"epsilon": base.privacy.epsilon, "delta": base.privacy.delta},
            "best": rows[0], "candidates": rows}


def main() -> None:
    """Tune a scenario's settings on validation rows and write the ranking to a JSON file.

    One thread, as each simulated site has. `--space` replaces the built-in grid; the result goes to
    `--out`, by default benchmarks/results/task_tuning_<scenario>.json.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-seed", type=int, default=7)
    parser.add_argument("--space", type=str, default=None, help="JSON grid replacing the built-in one")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = json.loads(args.space) if args.space else SPACES[args.scenario]
    result = tune(args.scenario, space, args.seeds, args.val_seed)
    out = args.out or RESULTS / f"task_tuning_{args.scenario}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("best:", json.dumps(result["best"]))


if __name__ == "__main__":
    main()
