"""Omics-scale inputs: a synthetic 3-site study with 5,000 gene-expression columns (issue #15, item 2).

Measures, on this machine:
1. drafting the study from the three files (`pm_common.data.draft`, what `pmfl contract draft` runs);
2. checking the study file (5,000 columns declared by one `[[contract.feature_groups]]`, prefix + range);
3. validating and encoding each site's file (every cell checked, log1p, no indicator inputs);
4. per-round wall time of the real simulation (Flower apps, DP-SGD at each site), and each site's own
   compute per round without Flower (evaluation + DP training, sequential), as benchmarks.study_time.

The data are synthetic (log-normal expression, an outcome driven by 20 genes); nothing here is about
real patients. Results: benchmarks/results/omics_scale.json.

    python -m benchmarks.omics_scale [--rows 300] [--genes 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from benchmarks.common import median, print_table, write_results
from benchmarks.study_time import pure_compute_per_round
from pm_common.data.draft import draft_study
from pm_common.data.tabular import NumberFormat, load_site_table
from pm_common.study.config import load_study
from simulations.runner import simulate

SITES = ("north", "central", "south")


def write_sites(folder: Path, rows: int, genes: int, seed: int = 0) -> list[Path]:
    """Three sites' exports: expression counts, age, sex and a binary response driven by 20 genes."""
    rng = np.random.default_rng(seed)
    weights = np.zeros(genes)
    weights[rng.choice(genes, 20, replace=False)] = rng.normal(0, 1.5, 20)
    paths = []
    for k, site in enumerate(SITES):
        expression = np.round(rng.lognormal(3 + 0.2 * k, 1.2, size=(rows, genes)).clip(0, 99_000), 1)
        logit = (np.log1p(expression) - 3.5) @ weights / 4
        frame = pd.DataFrame(expression, columns=[f"GENE_{i:04d}" for i in range(1, genes + 1)])
        frame.insert(0, "age", rng.integers(25, 90, rows))
        frame.insert(1, "sex", rng.choice(["F", "M"], rows))
        frame["response"] = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
        paths.append(folder / f"{site}.csv")
        frame.to_csv(paths[-1], index=False)
    return paths


def study_table(paths: list[Path], genes: int, rounds: int) -> dict:
    """The study as a researcher would write it: one feature group for the genes."""
    return {
        "study": {"name": "omics-scale", "rounds": rounds, "seed": 0},
        "model": {"name": "logreg"},
        "training": {"batch_size": 32, "learning_rate": 0.5, "max_grad_norm": 1.0},
        "privacy": {"dp": True, "epsilon": 3.0, "delta": 1e-5},
        "contract": {
            "target": {"name": "response", "positive": ["yes"], "negative": ["no"]},
            "features": [{"name": "age", "type": "numeric", "min": 18, "max": 100},
                         {"name": "sex", "type": "categorical", "values": ["F", "M"]}],
            "feature_groups": [{"name": "expression", "prefix": "GENE_", "range": [1, genes], "digits": 4,
                                "type": "numeric", "min": 0, "max": 100_000, "transform": "log1p",
                                "missing": "error"}],
        },
        "sites": [{"name": site, "data": str(path)} for site, path in zip(SITES, paths, strict=True)],
    }


def main() -> None:
    """Measure each step of an omics-scale study on synthetic data, print the table, write the results.

    Times drafting the study, checking it, validating and encoding each site's file (median of 3), the
    simulation's round wall time and the sites' pure compute per round.
    Writes benchmarks/results/omics_scale.json.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="rows per site")
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_sites(folder, args.rows, args.genes)
        start = time.perf_counter()
        drafted = draft_study(paths, target="response", out=folder / "draft.toml")
        draft_s = time.perf_counter() - start
        study_path = folder / "study.toml"
        study_path.write_text(tomli_w.dumps(study_table(paths, args.genes, args.rounds)), encoding="utf-8")
        start = time.perf_counter()
        study = load_study(study_path)
        study_s = time.perf_counter() - start
        validate_s = []
        for site in study.sites:  # median of 3: the machine is shared, single timings are noisy
            times = []
            for _ in range(3):
                start = time.perf_counter()
                table = load_site_table(site.data, study.contract, number_format=NumberFormat())
                times.append(time.perf_counter() - start)
            validate_s.append(median(times))
            assert table.x.shape == (args.rows, study.contract.num_inputs)
        stamps: list[float] = []
        metrics = simulate(study, folder / "run", progress=lambda _: stamps.append(time.perf_counter()))
        round_s = [b - a for a, b in itertools.pairwise(stamps)]
        compute_s = pure_compute_per_round(study_path)
    final = metrics["rounds"][-1]
    rows = [
        ["draft the study from 3 files (pm_common.data.draft)", draft_s],
        ["check the study file (load_study)", study_s],
        *[[f"read + validate + encode {site} ({args.rows} rows, median of 3)", s]
          for site, s in zip(SITES, validate_s, strict=True)],
        ["median round wall time (simulation, 3 sites, DP; rounds 2..)", median(round_s)],
        ["median pure compute per round (3 sites sequential)", median(compute_s)],
    ]
    print_table(f"Omics scale: {args.genes} gene columns, {study.contract.num_inputs} model inputs, "
                f"3 sites x {args.rows} rows, {args.rounds} rounds (seconds)", ["measure", "s"], rows)
    print(f"final round: mean site accuracy {final['mean_site_accuracy']:.3f}, pooled accuracy "
          f"{final['pooled_accuracy']:.3f} (synthetic data)")
    write_results("omics_scale", {
        "genes": args.genes, "rows_per_site": args.rows, "rounds": args.rounds,
        "num_inputs": study.contract.num_inputs,
        "draft_feature_groups": drafted.count("[[contract.feature_groups]]"),
        "draft_s": draft_s, "study_check_s": study_s,
        "validate_encode_s": dict(zip(SITES, validate_s, strict=True)),
        "round_wall_s": round_s, "compute_per_round_s": compute_s,
        "final_mean_site_accuracy": final["mean_site_accuracy"],
        "final_pooled_accuracy": final["pooled_accuracy"],
    })


if __name__ == "__main__":
    main()
