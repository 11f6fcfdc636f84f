"""Robust aggregation against one poisoned site: FLamby's metric (mean over sites of local test
accuracy) of the final model for each aggregator, clean and with one of the four hospitals
poisoned (simulations/attacks.py: the site trains honestly, then sends a sign-flipped or a 10x
scaled update), medians over seeds. Default study: heart disease, 20 rounds, DP-SGD at epsilon 3
per site.

A reference row shows what FedAvg reaches when the poisoned site's updates are never used (it
sends NaNs, which validation rejects; it still evaluates): the best any rule that excludes the
attacker can do, since excluding it also loses its honest data.

Two tables: the mean over all four sites (the attacker's own patients included), and the mean over
the three honest sites (the same three sites in the clean run): what the federation delivers to
the hospitals that played fair.

    python -m benchmarks.robust_aggregation [--seeds 3] [--rounds 20] [--attacker cleveland] [--tag _x]
        [--aggregators fedavg,history-krum] [--norm-bound 3.0]   # adds a row: FedAvg with a bound
    python -m benchmarks.robust_aggregation --tables-from benchmarks/results/F.json --tag _x  # no new runs

The last column is a 90% percentile-bootstrap interval of the worst poisoned median minus the clean
FedAvg median: DP noise draws from OS entropy, not the seed, so runs differ by more than their seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, median_difference_interval, print_table, write_results
from pm_common.study.config import StudyConfig, load_study, study_from_dict, with_overrides
from pm_common.tasks.metrics import mean_over_sites
from simulations.attacks import with_attacks
from simulations.runner import simulate
from simulations.scenarios import scenario_path

_HISTORY: dict[str, Any] = {"name": "krum", "krum_history": 0.5}
AGGREGATORS: dict[str, dict[str, Any]] = {  # row -> [strategy] settings
    "fedavg": {"name": "fedavg"},
    "trimmed-mean": {"name": "trimmed-mean"},
    "median": {"name": "median"},
    "krum": {"name": "krum"},
    "multi-krum": {"name": "krum", "krum_select": 3},
    "history-krum": _HISTORY,
    "history-krum-median": {**_HISTORY, "krum_aggregate": "median"},
    "history-median": {**_HISTORY, "krum_aggregate": "median", "krum_score": "median"},
}
ATTACKS: tuple[str | None, ...] = (None, "sign-flip", "scale:10")  # None: the clean run
REFERENCE = "fedavg, attacker's updates never used (reference)"


def _study(base: StudyConfig, strategy: dict[str, Any]) -> StudyConfig:
    raw: dict[str, Any] = copy.deepcopy(dict(base.raw))
    raw.setdefault("strategy", {}).update(strategy)
    return study_from_dict(raw, Path("."))


def _median(values: list[float | None]) -> float | None:
    """Median over the runs that finished with an evaluation (a run whose sites all failed has none)."""
    finished = [v for v in values if v is not None]
    return median(finished) if finished else None


def main() -> None:
    """Run every aggregator clean and under each attack over seeds, then print and write both tables.

    Also runs the reference (the attacker's updates withheld). With `--tables-from`, redoes the tables of
    an earlier results file without new runs.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--attacker", default="cleveland", help="the poisoned site (default: the largest)")
    parser.add_argument("--norm-bound", type=float, default=None, help="also run FedAvg with this bound")
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS), help="rows to run (fedavg first)")
    parser.add_argument("--tag", default="", help="suffix of the results file (keeps earlier runs)")
    parser.add_argument("--tables-from", type=Path, help="redo the tables of a results file from its runs")
    args = parser.parse_args()
    if args.tables_from:
        saved = json.loads(args.tables_from.read_text())
        report(saved["results"], attacker=saved["attacker"], rounds=saved["rounds"], seeds=saved["seeds"],
               minutes=saved["minutes"], tag=args.tag)
        return
    settings = {name: AGGREGATORS[name] for name in args.aggregators.split(",")}
    if args.norm_bound is not None:
        settings["fedavg"] = {"name": "fedavg"}
        settings["fedavg, bounded"] = {"name": "fedavg", "max_update_norm": args.norm_bound}
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:

        def final_accuracies(strategy: dict[str, Any], attack: str | None, seed: int) -> dict[str, float]:
            """Each site's accuracy on its own test rows, final model."""
            base = with_overrides(load_study(scenario_path("heart-disease")), rounds=args.rounds, seed=seed)
            study = with_attacks(_study(base, strategy), {args.attacker: attack} if attack else {})
            out = Path(tmp) / f"{len(results)}-{attack}-{seed}"
            sites = simulate(study, out)["rounds"][-1]["sites"]
            return {site: float(m["accuracy"]) for site, m in sites.items()}

        for label, strategy in settings.items():
            runs = {
                a or "clean": [final_accuracies(strategy, a, s) for s in range(args.seeds)] for a in ATTACKS
            }
            results.append({"aggregator": label, "strategy": strategy, "site_accuracy": runs})
        withheld = [final_accuracies({"name": "fedavg"}, "nan", s) for s in range(args.seeds)]
        results.append(
            {"aggregator": REFERENCE, "strategy": {"name": "fedavg"}, "site_accuracy": {"nan": withheld}}
        )
    minutes = (time.perf_counter() - started) / 60
    report(results, attacker=args.attacker, rounds=args.rounds, seeds=args.seeds, minutes=minutes,
           tag=args.tag)


def report(results: list[dict[str, Any]], *, attacker: str, rounds: int, seeds: int, minutes: float,
           tag: str) -> None:
    """Print both tables and write them with every run's site accuracies."""
    tables = {}
    for view, honest_only in (("all sites", False), ("honest sites", True)):
        per_seed = [_per_seed(r, attacker if honest_only else None) for r in results]
        clean = per_seed[0]["clean"]  # the first row's clean runs (FedAvg by default)
        rows = []
        for result, runs in zip(results, per_seed, strict=True):
            medians = [_median(runs[a or "clean"]) if (a or "clean") in runs else None for a in ATTACKS]
            poisoned = {a: m for a, m in zip(ATTACKS[1:], medians[1:], strict=True) if m is not None}
            worst = min(poisoned, key=lambda a: poisoned[a], default=None)
            if worst is None or not clean:
                rows.append([_label(result), *medians, None, None])
                continue
            finished = [v for v in runs[worst] if v is not None]
            low, high = median_difference_interval(finished, [v for v in clean if v is not None])
            rows.append([_label(result), *medians, 100 * (poisoned[worst] - _median(clean)),
                         f"{100 * low:+.1f} to {100 * high:+.1f}"])
        title = (f"Heart disease, 4 sites x {rounds} rounds, DP eps 3, {attacker} poisoned, "
                 f"{seeds} seeds: mean accuracy over {view} (medians over seeds; {minutes:.1f} min)")
        header = ["aggregator", "clean", "sign-flip", "scale:10", "worst vs clean FedAvg (points)",
                  "90% bootstrap interval"]
        print_table(title, header, rows)
        tables[view] = [dict(zip(header, row, strict=True)) for row in rows]
    write_results(f"robust_aggregation_{attacker}{tag}", {
        "rounds": rounds, "seeds": seeds, "attacker": attacker, "epsilon": 3.0,
        "attacks": [a or "clean" for a in ATTACKS], "minutes": minutes, "tables": tables, "results": results,
    })


def _per_seed(result: dict[str, Any], leave_out: str | None) -> dict[str, list[float | None]]:
    """Each run's mean accuracy over the sites, `leave_out`'s not counted, by attack (the reference
    row: its withheld runs stand for every attack)."""
    def mean_of(accuracies: dict[str, float]) -> float | None:
        return mean_over_sites([a for site, a in accuracies.items() if site != leave_out])

    runs = {attack: [mean_of(r) for r in seeds] for attack, seeds in result["site_accuracy"].items()}
    if "nan" in runs:
        return {a: runs["nan"] for a in ATTACKS[1:]}
    return runs


def _label(result: dict[str, Any]) -> str:
    settings_text = ", ".join(f"{k} {v}" for k, v in result["strategy"].items() if k != "name")
    return f"{result['aggregator']} ({settings_text})" if settings_text else result["aggregator"]


if __name__ == "__main__":
    main()
