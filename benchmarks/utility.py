"""Utility of the default study: FLamby's metric (mean over sites of local test accuracy).

Each setting runs the real simulated federation (4 hospitals, 20 rounds, logistic regression,
FedAvg) with every site's budget at epsilon in {1, 3, 8} (delta 1e-5) and without DP, over
5 seeds (initial model; DP noise and Poisson sampling are fresh in every run); medians.

    python -m benchmarks.utility [--seeds 5] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import median, print_table, write_results
from pm_common.study.config import load_study, with_overrides
from simulations.runner import simulate
from simulations.scenarios import scenario_path

SETTINGS: tuple[float | None, ...] = (1.0, 3.0, 8.0, None)  # None: no DP


def main() -> None:
    """Measure the default study's utility at epsilon 1, 3, 8 per site and without DP, print and write it.

    Each setting runs the real simulated federation once per seed; the table gives the median, minimum and
    maximum of FLamby's metric, the median pooled accuracy and the largest epsilon any site spent (showing
    the budget held). Writes benchmarks/results/utility.json.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--strategy", default="fedavg")
    args = parser.parse_args()
    base = load_study(scenario_path("heart-disease"))
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for epsilon in SETTINGS:
            mean_site, pooled, spent = [], [], []
            for seed in range(args.seeds):
                study = with_overrides(base, rounds=args.rounds, seed=seed, strategy=args.strategy,
                                       epsilon=epsilon, dp=epsilon is not None, delta=1e-5)
                out = Path(tmp) / f"eps{epsilon}-seed{seed}"
                final = simulate(study, out)["rounds"][-1]
                mean_site.append(final["mean_site_accuracy"])
                pooled.append(final["pooled_accuracy"])
                if epsilon is not None:
                    summary = json.loads((out / "privacy" / "summary.json").read_text())
                    spent.append(max(s["epsilon"] for s in summary["sites"].values()))
            label = "no DP" if epsilon is None else f"{epsilon:g}"
            rows.append([label, median(mean_site), min(mean_site), max(mean_site), median(pooled),
                         max(spent) if spent else None])
            results.append({"epsilon": epsilon, "delta": 1e-5, "mean_site_accuracy": mean_site,
                            "pooled_accuracy": pooled, "max_epsilon_spent": spent})
    title = f"Heart disease, 4 sites x {args.rounds} rounds, {args.strategy}, {args.seeds} seeds (medians)"
    print_table(title,
                ["epsilon per site", "FLamby metric", "min", "max", "pooled acc", "max eps spent"], rows)
    write_results("utility", {"rounds": args.rounds, "seeds": args.seeds, "strategy": args.strategy,
                              "results": results})


if __name__ == "__main__":
    main()
