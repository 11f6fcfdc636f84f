"""Imaging: a fast, paired sweep of training settings for the federation and each site alone.

The real benchmark (benchmarks/imaging_federated_vs_local.py) runs the simulation with fresh DP
noise per run, and single runs vary a lot, so a setting that looks better in one run often is not.
This sweep runs the sites' real local training (client.training.train_round, Opacus DP-SGD, the
sites' own privacy plans) in one process, aggregates as Flower's FedAvgM does (weighted by training
images, pseudo-gradient momentum, server learning rate), and derives every run's Poisson sampling
and noise seed from (seed, round, site): two settings run with the same seeds meet the same draws,
so their difference is the setting's, not the noise's. Known noise seeds void the DP guarantee:
this is for tuning on synthetic data only; the apps always draw them from OS entropy.

Each line of output is appended to --log. Examples (what was tried is in the README):

    python -m benchmarks.imaging_tuning --seeds 4 --fed-only
    python -m benchmarks.imaging_tuning --seeds 4 --normalize --learning-rate 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import client.training as local
from client.training import LocalTraining, predict, train_round
from pm_common.models import images as image_models
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import StudyConfig, with_overrides
from pm_common.tasks import SiteTensors, task_of
from simulations.runner import check_sites
from simulations.scenarios import scenario_study

CPU = torch.device("cpu")
Scores = tuple[float, float, float]  # pooled balanced accuracy, AUC, accuracy


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each image to zero mean and unit standard deviation (MONAI's NormalizeIntensity)."""
    mean, std = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def noise_seed(*key: object) -> int:
    """A 60-bit seed derived from `key` (see the module docstring: tuning only)."""
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16)


def fedavgm(
    old: dict[str, torch.Tensor],
    updates: list[tuple[int, dict[str, torch.Tensor]]],
    momentum: dict[str, torch.Tensor] | None,
    server_momentum: float,
    server_lr: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Flower's FedAvgM: weighted mean, pseudo-gradient old - mean, momentum from round 1 on."""
    total = sum(n for n, _ in updates)
    mean = {k: sum(n * sd[k].float() for n, sd in updates) / total for k in old}
    step = {k: old[k] - mean[k] for k in old}
    if server_momentum > 0:
        momentum = step if momentum is None else {k: server_momentum * momentum[k] + step[k] for k in old}
        step = momentum
    return {k: old[k] - server_lr * step[k] for k in old}, momentum


class Sweep:
    """One setting: the federation and (unless fed-only) each site alone, seed by seed."""

    def __init__(self, args: argparse.Namespace, study: StudyConfig, sites: dict[str, SiteTensors]) -> None:
        self.a, self.study, self.sites, self.task = args, study, sites, task_of(study)
        tests = [(d.test_x, d.test_y) for d in sites.values()]
        self.test_x, self.test_y = torch.cat([x for x, _ in tests]), torch.cat([y for _, y in tests])
        self.schedule = [float(v) for v in args.schedule.split(",")] if args.schedule else [1.0] * args.rounds

    def settings(self, epochs: int, factor: float = 1.0) -> LocalTraining:
        a = self.a
        return LocalTraining(
            learning_rate=a.learning_rate * factor,
            batch_size=a.batch_size,
            local_epochs=epochs,
            momentum=a.momentum,
            proximal_mu=a.proximal_mu or a.weight_decay,
        )

    def plan(self, n: int, epochs: int, rounds: int) -> Any:
        a = self.a
        return plan_study(
            epsilon_budget=a.epsilon,
            delta=1e-5,
            num_examples=n,
            batch_size=a.batch_size,
            local_epochs=epochs,
            planned_rounds=rounds,
            max_grad_norm=a.max_grad_norm,
        )

    def model(self, seed: int) -> nn.Module:
        return self.task.build_model(with_overrides(self.study, seed=seed), seed)

    def score(self, model: nn.Module) -> Scores:
        m = self.task.metrics(predict(model, self.test_x, CPU), self.test_y)
        return m["balanced_accuracy"], m["auc"], m["accuracy"]

    def federated(self, seed: int) -> Scores:
        a, crit = self.a, self.task.criterion()
        model = self.model(seed)
        plans = {n: self.plan(len(d.train_y), a.epochs, a.rounds) for n, d in self.sites.items()}
        accountants: dict[str, Any] = {n: {} for n in self.sites}
        momentum = None
        for r in range(a.rounds):
            old = {k: v.clone() for k, v in model.state_dict().items()}
            updates = []
            for name, data in self.sites.items():
                site = self.model(seed)
                site.load_state_dict(old)
                out = train_round(
                    site,
                    data.train_x,
                    data.train_y,
                    crit,
                    self.settings(a.epochs, self.schedule[r]),
                    plan=plans[name],
                    accountant_state=accountants[name],
                    seed=noise_seed(a.salt, seed, r, name) if a.salt else noise_seed(seed, r, name),
                    device=CPU,
                )
                accountants[name] = out.accountant
                updates.append((len(data.train_y), out.state_dict))
            new, momentum = fedavgm(old, updates, momentum, a.server_momentum, a.server_learning_rate)
            model.load_state_dict(new)
        return self.score(model)

    def alone(self, seed: int, name: str) -> Scores:
        a, data = self.a, self.sites[name]
        epochs = a.rounds * a.epochs
        model = self.model(seed)
        train_round(
            model,
            data.train_x,
            data.train_y,
            self.task.criterion(),
            self.settings(epochs),
            plan=self.plan(len(data.train_y), epochs, 1),
            accountant_state={},
            seed=noise_seed(a.salt, seed, "alone", name) if a.salt else noise_seed(seed, "alone", name),
            device=CPU,
        )
        return self.score(model)


def _patch_model_and_training(a: argparse.Namespace) -> None:
    """Model and training variants that the study config does not (yet) express."""
    widths = tuple(int(w) for w in a.widths.split(","))
    original = image_models.SmallCNN.__init__

    def init(
        self: image_models.SmallCNN, c: int, k: int, size: int, _widths: tuple[int, ...] = widths
    ) -> None:
        original(self, c, k, size, _widths)
        if a.no_head_bias:
            self.head = nn.Linear(self.head.in_features, self.head.out_features, bias=False)

    image_models.SmallCNN.__init__ = init  # type: ignore[method-assign]
    if a.weight_decay:
        if a.proximal_mu:
            raise SystemExit("--weight-decay and --proximal-mu share the post-step hook: pick one")

        def decay(model: nn.Module, anchor: Any, lr: float, mu: float) -> None:
            with torch.no_grad():  # decoupled weight decay after each private step (post-processing)
                for p in model.parameters():
                    p.mul_(1 - lr * mu)

        local._proximal_step = decay  # type: ignore[assignment]


def main() -> None:
    """Score one set of training settings on the imaging scenario, seed by seed, and append it to the log.

    The settings come from the command line; the federation and (unless `--fed-only`) each site alone are
    trained under DP with seeded noise, so that runs of different settings are paired. Prints each seed's
    pooled balanced accuracy and AUC, then their medians, and appends that summary to `--log`.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--fed-only", action="store_true")
    ap.add_argument("--alone-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--learning-rate", type=float, default=2.0)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--server-momentum", type=float, default=0.9)
    ap.add_argument("--server-learning-rate", type=float, default=1.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--proximal-mu", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--schedule", default="", help="learning-rate factor per round, e.g. 1,1,1,0.5,0.25")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--widths", default="8,16,32")
    ap.add_argument("--normalize", action="store_true", help="z-score each image")
    ap.add_argument("--no-head-bias", action="store_true")
    ap.add_argument("--salt", default="", help="another set of noise draws for the same seeds")
    ap.add_argument("--log", type=Path, default=Path("imaging_tuning.log"))
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _patch_model_and_training(a)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        study = scenario_study("imaging-synthetic", Path(tmp))
        sites = check_sites(study)
    if a.normalize:
        sites = {
            n: dataclasses.replace(d, train_x=standardize(d.train_x), test_x=standardize(d.test_x))
            for n, d in sites.items()
        }
    sweep = Sweep(a, study, sites)
    results: dict[str, list[Scores]] = {} if a.alone_only else {"federated": []}
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        if not a.alone_only:
            results["federated"].append(sweep.federated(seed))
        if not a.fed_only:
            for name in sites:
                results.setdefault(f"{name} alone", []).append(sweep.alone(seed, name))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1][0]:.3f}/{v[-1][1]:.3f}" for k, v in results.items()))
    options = " ".join(f"{k}={v}" for k, v in vars(a).items() if k not in ("log", "tag"))
    line = (
        f"{a.tag} {options}\n  median pooled bal. acc/AUC: "
        + " | ".join(
            f"{k} {statistics.median(s[0] for s in v):.3f}/{statistics.median(s[1] for s in v):.3f}"
            for k, v in results.items()
        )
        + "\n  per seed: "
        + " ".join(f"{s[0]:.3f}/{s[1]:.3f}" for s in next(iter(results.values())))
        + f"  [{time.perf_counter() - started:.0f} s]"
    )
    print(line)
    with a.log.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
