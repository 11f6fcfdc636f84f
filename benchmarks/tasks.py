"""Each new task's built-in scenario under DP (epsilon 3 per site) against a tuned pooled non-private
baseline, and for tcga-brca against each region alone under the same budget.

    python -m benchmarks.tasks [--seeds 0-4] [--scenario NAME ...] [--no-alone]

Federated: `pmfl simulate NAME --seeds 0-4 --out DIR` as shipped (DP-SGD, epsilon 3, delta 1e-5 at
every site; one engine start for all seeds), each seed's final model (DIR/seed-<s>/model.pt) scored
on all sites' test rows together (for tcga-brca: FLamby's pooled test set). The run's own
metrics.json reports `weighted_site_mean`: the per-site metric weighted by test rows (sites never share
per-patient predictions); for R², balanced accuracy and the C-index that is not the metric on the
pooled rows, so it is recorded beside it (`sweep_weighted_site_mean`) but the headline is recomputed
here from the model.

Pooled non-private: the same architecture trained centrally, without DP, on all sites' training rows
together, with Adam; its learning rate, weight decay and number of epochs are chosen on a stratified
20 % validation split of those pooled TRAINING rows (benchmarks.task_tuning.split_rows, seed 7), then
the model is retrained on all pooled training rows with the chosen settings, one fit per seed.

Alone (tcga-brca): a one-site federation per region (the scenario's TOML reduced to that region,
everything else as shipped, its own epsilon 3), 5 seeds, scored on the same pooled test set.

Prints a table and writes benchmarks/results/tasks.json (medians, min and max over the seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
import torch

from benchmarks.common import print_table, write_results
from benchmarks.task_tuning import split_rows
from client.training import predict
from pm_common.study.config import StudyConfig, load_study
from pm_common.tasks import task_of
from simulations.scenarios import scenario_path, scenario_study
from simulations.sweep import parse_seeds, stats

SCENARIOS = ("heart-disease-severity", "diabetes-progression", "tcga-brca")
ALONE = ("tcga-brca",)
FLAMBY_TCGA = {"pooled": 0.704, "fedavg": 0.735, "fedadam": 0.842, "best_region_alone": 0.728}
POOLED_GRID = {"lr": (1e-3, 1e-2, 1e-1), "weight_decay": (0.0, 1e-3, 1e-2),
               "epochs": (5, 10, 20, 50, 100, 200)}
POOLED_BATCH = 32
VAL_SEED = 7
REUSE = False  # --reuse: score sweeps already in --work (their sweep.json and wall_s.txt) instead
RESULTS_FILE = Path(__file__).parent / "results" / "tasks.json"


def pooled_rows(study: StudyConfig) -> tuple[torch.Tensor, ...]:
    """All sites' train and test rows, each site split as it would split its own."""
    task = task_of(study)
    parts = [task.load_site(spec, study) for spec in study.sites]
    keys = ("train_x", "train_y", "test_x", "test_y")
    return tuple(torch.cat([getattr(p, k) for p in parts]) for k in keys)


def sweep(study: str | Path, seeds: str, out: Path) -> float:
    """`pmfl simulate SCENARIO` (a name) or `pmfl simulate --config STUDY.toml` (a path), with
    `--seeds SEEDS --out OUT`; its wall time."""
    wall_file = Path(out) / "wall_s.txt"
    if REUSE and (Path(out) / "sweep.json").exists() and wall_file.exists():
        return float(wall_file.read_text(encoding="utf-8"))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    which = ["--config", str(study)] if isinstance(study, Path) else [study]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pmfl.cli", "simulate", *which, "--seeds", seeds,
                    "--out", str(out), "--overwrite"], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    wall_file.write_text(f"{wall}\n", encoding="utf-8")
    return wall


def alone_config(study: StudyConfig, name: str, site: dict[str, Any], work: Path) -> Path:
    """The scenario's study reduced to one site (everything else as shipped), as a TOML file."""
    raw = copy.deepcopy(dict(study.raw))
    raw["sites"] = [site]
    raw["study"]["name"] = f"{name}-{site['name']}-alone"
    return write_config(raw, scenario_path(name).parent, work / f"{name}-{site['name']}.toml")


def score_sweep(study: StudyConfig, out: Path, seeds: tuple[int, ...]) -> list[dict[str, float]]:
    """Each seed's final model on all sites' test rows together."""
    task = task_of(study)
    _, _, test_x, test_y = pooled_rows(study)
    scored = []
    for seed in seeds:
        saved = torch.load(out / f"seed-{seed}" / "model.pt", weights_only=False)
        model = task.build_model(study)
        model.load_state_dict(saved["state_dict"])
        scored.append(task.metrics(predict(model, test_x, torch.device("cpu")), test_y))
    return scored


def write_config(raw: dict[str, Any], base: Path, path: Path) -> Path:
    """The study as a TOML file, its sites' data paths made absolute."""
    raw = copy.deepcopy(raw)
    for site in raw.get("sites", []):
        for key in ("data", "test_data"):
            if key in site:
                site[key] = str((base / site[key]).resolve())
    path.write_bytes(tomli_w.dumps(raw).encode())
    return path


def _fit(model: torch.nn.Module, criterion: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
         weight_decay: float, epochs: int, seed: int, checkpoints: tuple[int, ...] = (),
         on_checkpoint: Any = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(1, epochs + 1):
        model.train()
        for rows in torch.randperm(len(y), generator=generator).split(POOLED_BATCH):
            optimizer.zero_grad()
            criterion(model(x[rows]), y[rows]).backward()
            optimizer.step()
        if epoch in checkpoints and on_checkpoint is not None:
            on_checkpoint(epoch)


def choose_pooled_settings(study: StudyConfig) -> dict[str, Any]:
    """Adam's learning rate, weight decay and epochs with the best headline metric on a validation split
    of the pooled training rows (the test rows are not used)."""
    task = task_of(study)
    train_x, train_y, _, _ = pooled_rows(study)
    fit_x, fit_y, val_x, val_y = split_rows(train_x, train_y, VAL_SEED, fraction=0.2)
    sign = 1.0 if task.higher_is_better else -1.0
    best: dict[str, Any] = {"score": -float("inf")}
    for lr in POOLED_GRID["lr"]:
        for weight_decay in POOLED_GRID["weight_decay"]:
            model = task.build_model(study, seed=0)

            def check(epoch: int, lr: float = lr, weight_decay: float = weight_decay,
                      model: torch.nn.Module = model) -> None:
                value = task.metrics(predict(model, val_x, torch.device("cpu")), val_y).get(task.headline)
                if value is not None and sign * value > best["score"]:
                    best.update(score=sign * value, lr=lr, weight_decay=weight_decay, epochs=epoch,
                                validation=value)

            _fit(model, task.criterion(), fit_x, fit_y, lr, weight_decay, max(POOLED_GRID["epochs"]), 0,
                 POOLED_GRID["epochs"], check)
    best.pop("score")
    return best


def pooled_non_private(study: StudyConfig, settings: dict[str, Any], seed: int) -> dict[str, float]:
    """The same model trained centrally on every site's training rows, no DP, chosen settings."""
    task = task_of(study)
    train_x, train_y, test_x, test_y = pooled_rows(study)
    model = task.build_model(study, seed=seed)
    _fit(model, task.criterion(), train_x, train_y, settings["lr"], settings["weight_decay"],
         settings["epochs"], seed)
    return task.metrics(predict(model, test_x, torch.device("cpu")), test_y)


def main() -> None:
    """Measure each scenario federated, pooled without DP and (tcga-brca) per region alone; print and write.

    Writes benchmarks/results/tasks.json with the command that produced each scenario's results; with
    `--merge` the other scenarios' results already in that file are kept.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--no-alone", action="store_true", help="skip tcga-brca's regions alone")
    parser.add_argument("--merge", action="store_true",
                        help="keep other scenarios' results already in tasks.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the sweeps' run directories here")
    parser.add_argument("--reuse", action="store_true",
                        help="score finished sweeps already under --work instead of running them again")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    work = args.work or Path(tempfile.mkdtemp(prefix="pmfl-tasks-"))
    results: dict[str, Any] = {}
    rows = []
    for name in args.scenario:
        study = scenario_study(name, work)
        task = task_of(study)
        metric = task.headline
        wall = sweep(name, args.seeds, work / name)
        fed = score_sweep(study, work / name, seeds)
        summary = json.loads((work / name / "sweep.json").read_text(encoding="utf-8"))
        settings = choose_pooled_settings(study)
        pooled = [pooled_non_private(study, settings, seed) for seed in seeds]
        entry: dict[str, Any] = {
            "metric": metric, "seeds": list(seeds), "sweep_wall_s": wall,
            "settings": {k: study.raw.get(k) for k in ("study", "model", "training", "strategy", "privacy")},
            "intervals": list(getattr(study.contract.target, "intervals", ()) or ()),
            "federated_dp_eps3": {"per_seed": fed, metric: stats([m[metric] for m in fed]),
                                  "sweep_weighted_site_mean": summary["final"].get("weighted_site_mean")},
            "pooled_non_private": {"settings": settings, "per_seed": pooled,
                                   metric: stats([m[metric] for m in pooled])},
        }
        rows.append([name, metric, "federated DP eps 3", *_cells(entry["federated_dp_eps3"][metric]),
                     f"{wall:.0f}"])
        rows.append([name, metric, "pooled, no DP (tuned)", *_cells(entry["pooled_non_private"][metric]), ""])
        if name in ALONE and not args.no_alone:
            entry["alone_dp_eps3"] = {}
            for site in study.raw["sites"]:
                config = alone_config(study, name, site, work)
                alone_study = load_study(config)
                wall = sweep(config, args.seeds, work / f"{name}-{site['name']}")
                alone = [task.metrics(*_rescore(alone_study, study, work / f"{name}-{site['name']}", s))
                         for s in seeds]
                entry["alone_dp_eps3"][site["name"]] = {"per_seed": alone,
                                                        metric: stats([m[metric] for m in alone]),
                                                        "sweep_wall_s": wall}
                rows.append([name, metric, f"{site['name']} alone, DP eps 3",
                             *_cells(entry["alone_dp_eps3"][site["name"]][metric]), f"{wall:.0f}"])
        results[name] = entry
    print_table(f"New tasks over seeds {args.seeds}: pooled test rows of every site",
                ["scenario", "metric", "training", "median", "min", "max", "wall s"], rows)
    command = (f"python -m benchmarks.tasks --seeds {args.seeds} --scenario " + " ".join(args.scenario)
               + (" --no-alone" if args.no_alone else "") + (" --merge" if args.merge else "")
               + (" --reuse" if args.reuse else "") + (f" --work {args.work}" if args.work else ""))
    for entry in results.values():
        entry["command"] = command
    kept = {}
    if args.merge and RESULTS_FILE.exists():  # scenarios measured by another invocation stay
        kept = json.loads(RESULTS_FILE.read_text(encoding="utf-8")).get("results", {})
    write_results("tasks", {"commands": sorted({e["command"] for e in {**kept, **results}.values()}),
                            "results": {**kept, **results},
                            "flamby_tcga_brca_c_index_non_private": FLAMBY_TCGA})


def _rescore(alone_study: StudyConfig, study: StudyConfig, out: Path, seed: int) -> tuple[torch.Tensor, ...]:
    """A region-alone model's outputs on the whole federation's pooled test rows, and those rows' labels."""
    task = task_of(study)
    _, _, test_x, test_y = pooled_rows(study)
    saved = torch.load(out / f"seed-{seed}" / "model.pt", weights_only=False)
    model = task.build_model(alone_study)
    model.load_state_dict(saved["state_dict"])
    return predict(model, test_x, torch.device("cpu")), test_y


def _cells(s: dict[str, float]) -> list[float]:
    return [s["median"], s["min"], s["max"]]


if __name__ == "__main__":
    main()
