"""Robust aggregation against one poisoned site: FLamby's metric (mean over sites of local test
accuracy) of the final model for each aggregator, clean and with one of the four hospitals
poisoned (simulations/attacks.py: the site trains honestly, then sends a sign-flipped or a 10x
scaled update), medians over seeds. Default study: heart disease, DP-SGD at epsilon 3 per site.

    python -m benchmarks.robust_aggregation [--seeds 3] [--rounds 4] [--attacker cleveland]
        [--norm-bound 3.0]   # adds a row: FedAvg with [strategy] max_update_norm
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, print_table, write_results
from pm_common.config import StudyConfig, load_study, study_from_dict, with_overrides
from simulations.attacks import with_attacks
from simulations.runner import simulate
from simulations.scenarios import scenario_path

AGGREGATORS = ("fedavg", "trimmed-mean", "median", "krum")
ATTACKS: tuple[str | None, ...] = (None, "sign-flip", "scale:10")  # None: the clean run


def _study(base: StudyConfig, aggregator: str, norm_bound: float | None) -> StudyConfig:
    raw: dict[str, Any] = copy.deepcopy(dict(base.raw))
    raw.setdefault("strategy", {})["name"] = aggregator
    if norm_bound is not None:
        raw["strategy"]["max_update_norm"] = norm_bound
    return study_from_dict(raw, Path("."))


def _median(values: list[float | None]) -> float | None:
    """Median over the runs that finished with an evaluation (a run whose sites all failed has none)."""
    finished = [v for v in values if v is not None]
    return median(finished) if finished else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--attacker", default="cleveland", help="the poisoned site (default: the largest)")
    parser.add_argument("--norm-bound", type=float, default=None, help="also run FedAvg with this bound")
    args = parser.parse_args()
    settings: list[tuple[str, str, float | None]] = [(a, a, None) for a in AGGREGATORS]
    if args.norm_bound is not None:
        settings.append((f"fedavg, max_update_norm {args.norm_bound:g}", "fedavg", args.norm_bound))
    started = time.perf_counter()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, aggregator, bound in settings:
            finals: dict[str, list[float]] = {}
            for attack in ATTACKS:
                name = attack or "clean"
                finals[name] = []
                for seed in range(args.seeds):
                    base = with_overrides(load_study(scenario_path("heart-disease")), rounds=args.rounds,
                                          seed=seed)
                    study = with_attacks(_study(base, aggregator, bound),
                                         {args.attacker: attack} if attack else {})
                    out = Path(tmp) / f"{aggregator}-{bound}-{name}-{seed}"
                    finals[name].append(simulate(study, out)["rounds"][-1]["mean_site_accuracy"])
            results.append({"aggregator": label, "strategy": aggregator, "max_update_norm": bound,
                            "mean_site_accuracy": finals})
            rows.append([label, *(_median(finals[a or "clean"]) for a in ATTACKS)])
    clean = rows[0][1]  # clean FedAvg: the reference
    for row in rows:
        poisoned = [v for v in row[2:4] if v is not None]
        row.append(100 * (min(poisoned) - clean) if poisoned and clean is not None else None)
    minutes = (time.perf_counter() - started) / 60
    title = (f"Heart disease, 4 sites x {args.rounds} rounds, DP eps 3, {args.attacker} poisoned, "
             f"{args.seeds} seeds (medians of the final FLamby metric; {minutes:.1f} min)")
    header = ["aggregator", "clean", "sign-flip", "scale:10", "worst vs clean FedAvg (points)"]
    print_table(title, header, rows)
    write_results("robust_aggregation", {
        "rounds": args.rounds, "seeds": args.seeds, "attacker": args.attacker, "epsilon": 3.0,
        "attacks": [a or "clean" for a in ATTACKS], "minutes": minutes, "results": results,
    })


if __name__ == "__main__":
    main()
