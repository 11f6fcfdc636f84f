"""Personalised models per hospital on the built-in heart-disease study under DP: the global model,
finetune, ditto and fedper against each site alone under the same budget, and the README's fixed
batch against `[training] plan = "auto"`.

    python -m benchmarks.personalization [--seeds 0-4] [--epsilons 3 1 8] [--parts ...] [--jobs 2]
                                         [--work DIR] [--reuse]

Every configuration is one `pmfl simulate --config STUDY.toml --seeds 0-4 --out DIR` (one engine
start for all seeds): the heart-disease scenario's TOML as shipped (4 hospitals, 20 rounds, FedAvg,
batch 16, one local epoch, DP-SGD at delta 1e-5), with only these changes:

- `global`: `[privacy] epsilon` set (logreg, no personalisation);
- `finetune`, `ditto`: plus `[personalization] method`, at the shipped defaults (finetune: 1 epoch;
  ditto: lambda 0.1); nothing tuned;
- `global-mlp`, `fedper`: `[model] name = "mlp"` (hidden [32]), fedper with
  `local_layers = ["net.2"]` (the output layer stays at each site), the shipped default;
- `alone-<site>`: the study reduced to that one site (its own epsilon, everything else as shipped,
  logreg), a one-site federation;
- `auto`: `[training] plan = "auto"` (the fixed run is `global`).

Every model is scored here, on each site's own test rows (the site's split, seed 42, as the
simulation's): the global `model.pt` of each seed, each site's personal model (the file its
metrics.json names), each site-alone `model.pt`. Metrics: accuracy, balanced accuracy (mean recall
of the two classes; 0.5 = a constant predictor) and ROC AUC. No choice is made on test rows: every
setting is the shipped default. DP noise is not seeded, so seeds differ in initial model and noise.

Prints tables and writes benchmarks/results/personalization.json (per seed, medians, min and max).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_difference_interval, print_table, write_results
from benchmarks.tasks import write_config
from client.training import predict
from pm_common.study.config import StudyConfig, load_study
from pm_common.tasks import task_of
from pm_common.tasks.metrics import balanced_accuracy
from simulations.scenarios import scenario_path
from simulations.sweep import parse_seeds, stats

SCENARIO = "heart-disease"
SITES = ("cleveland", "hungary", "switzerland", "va_long_beach")
RESULTS_FILE = Path(__file__).parent / "results" / "personalization.json"
METRICS = ("accuracy", "balanced_accuracy", "auc")
# what each comparison part needs, in priority order
PARTS = {
    "core": ("global", "finetune", "ditto", "global-mlp", "fedper", *(f"alone-{s}" for s in SITES)),
    "auto": ("global", "auto"),
    "personal": ("global", "finetune", "ditto"),
}


def raw_config(name: str, epsilon: float) -> dict[str, Any]:
    """The scenario's study as shipped, changed only as `name` says."""
    raw = copy.deepcopy(dict(load_study(scenario_path(SCENARIO)).raw))
    raw["privacy"]["epsilon"] = float(epsilon)
    raw["study"]["name"] = f"{SCENARIO}-{name}-eps{epsilon:g}"
    if name in ("finetune", "ditto"):
        raw["personalization"] = {"method": name}
    elif name == "global-mlp":
        raw["model"]["name"] = "mlp"
    elif name == "fedper":
        raw["model"]["name"] = "mlp"
        raw["personalization"] = {"method": "fedper", "local_layers": ["net.2"]}
    elif name == "auto":
        raw["training"]["plan"] = "auto"
    elif name.startswith("alone-"):
        raw["sites"] = [s for s in raw["sites"] if s["name"] == name.removeprefix("alone-")]
    elif name != "global":
        raise ValueError(name)
    return raw


def run_sweep(name: str, epsilon: float, seeds: str, work: Path, reuse: bool) -> float:
    """One configuration's seeds as one `pmfl simulate --seeds` sweep (one engine start), as a user
    runs it.

    Args:
        name: the configuration (global, finetune, ditto, fedper, alone-SITE, ...).
        epsilon: every site's budget.
        seeds: the seeds, as `--seeds` takes them.
        work: where the sweeps are kept.
        reuse: keep a sweep already finished there.

    Returns:
        The sweep's wall time in seconds.
    """
    out = work / f"eps{epsilon:g}" / name
    wall_file = out / "wall_s.txt"
    if reuse and (out / "sweep.json").exists() and wall_file.exists():
        return float(wall_file.read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    config = write_config(raw_config(name, epsilon), scenario_path(SCENARIO).parent,
                          out.parent / f"{name}.toml")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    start = time.perf_counter()
    with open(out.parent / f"{name}.log", "w", encoding="utf-8") as log:
        subprocess.run([sys.executable, "-m", "pmfl.cli", "simulate", "--config", str(config),
                        "--seeds", seeds, "--out", str(out), "--overwrite"],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    wall_file.write_text(f"{wall}\n", encoding="utf-8")
    print(f"  eps {epsilon:g} {name}: {wall:.0f} s", flush=True)
    return wall


_TEST: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def site_test(study: StudyConfig, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's own test rows, encoded as its ClientApp encodes them (cached: every model is scored
    on the same rows).

    Args:
        study: the study.
        site: the site's name.

    Returns:
        (inputs, labels).
    """
    if site not in _TEST:
        task = task_of(study)
        spec = next(s for s in study.sites if s.name == site)
        part = task.load_site(spec, study)
        _TEST[site] = (part.test_x, part.test_y)
    return _TEST[site]


def score(study: StudyConfig, state_dict: dict[str, Any], site: str) -> dict[str, float]:
    """A model's accuracy, balanced accuracy and AUC on the site's own test rows."""
    task = task_of(study)
    model = task.build_model(study)
    model.load_state_dict(state_dict)
    x, y = site_test(study, site)
    logits = predict(model, x, torch.device("cpu"))
    metrics = task.metrics(logits, y)
    metrics["balanced_accuracy"] = balanced_accuracy((logits.reshape(-1) > 0).float(), y.reshape(-1))
    return {k: float(metrics[k]) for k in METRICS if k in metrics}


def score_config(name: str, epsilon: float, seeds: tuple[int, ...], work: Path) -> dict[str, Any]:
    """Per seed and site: the global model's metrics (if a whole one exists), the personal model's,
    and the run's own per-site figures from metrics.json (mean site accuracy)."""
    out = work / f"eps{epsilon:g}" / name
    study = load_study(out.parent / f"{name}.toml")
    sites = [s.name for s in study.sites]
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        run = out / f"seed-{seed}"
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        final = metrics["rounds"][-1]
        entry: dict[str, Any] = {"seed": seed, "mean_site_accuracy": final.get("mean_site_accuracy"),
                                 "flagged_no_better_than_baseline": sorted(
                                     s for s, m in final.get("sites", {}).items()
                                     if m.get("no_better_than_baseline")),
                                 "baseline": {s: m.get("baseline")
                                              for s, m in final.get("sites", {}).items()},
                                 "global": {}, "personal": {}}
        if name != "fedper":
            saved = torch.load(run / "model.pt", weights_only=False)
            entry["global"] = {s: score(study, saved["state_dict"], s) for s in sites}
        for site, rec in (metrics.get("personalization") or {}).get("sites", {}).items():
            if rec.get("model"):
                saved = torch.load(rec["model"], weights_only=False)
                entry["personal"][site] = score(study, saved["state_dict"], site)
            else:
                entry["personal"][site] = {"reason": rec.get("reason")}
        per_seed.append(entry)
    return {"per_seed": per_seed}


def present_stats(values: list[float | None]) -> dict[str, float] | None:
    """`stats` over the seeds that have the value (a site without metrics in a seed has none).

    Args:
        values: one value per seed, None where the seed has none.

    Returns:
        The stats, or None when no seed has the value.
    """
    found = [v for v in values if v is not None]
    return stats(found) if found else None


def site_stats(per_seed: list[dict[str, Any]], which: str, site: str) -> dict[str, Any]:
    """Each metric of one site's global or personal model over seeds.

    Args:
        per_seed: the scored seeds of one configuration.
        which: "global" or "personal".
        site: the site.

    Returns:
        metric -> stats (None where no seed has it).
    """
    return {m: present_stats([e[which].get(site, {}).get(m) for e in per_seed]) for m in METRICS}


def summarise(scored: dict[str, Any]) -> dict[str, Any]:
    """Medians and ranges per site for each configuration the epsilon has."""
    table: dict[str, Any] = {}
    for name, entry in scored.items():
        ps = entry["per_seed"]
        if name.startswith("alone-"):
            site = name.removeprefix("alone-")
            table.setdefault("alone", {})[site] = site_stats(ps, "global", site)
            continue
        row: dict[str, Any] = {"mean_site_accuracy": present_stats([e["mean_site_accuracy"] for e in ps])}
        if name != "fedper":
            row["global"] = {s: site_stats(ps, "global", s) for s in SITES}
        if name in ("finetune", "ditto", "fedper"):
            row["personal"] = {s: site_stats(ps, "personal", s) for s in SITES}
            row["mean_site_accuracy_personal"] = stats(
                [statistics.mean(e["personal"][s]["accuracy"] for s in SITES) for e in ps
                 if all("accuracy" in e["personal"].get(s, {}) for s in SITES)])
        row["flagged_no_better_than_baseline"] = [e["flagged_no_better_than_baseline"] for e in ps]
        # the run's own majority-class flag (accuracy of always predicting the site's training
        # majority): per site, in how many seeds the global model was flagged
        row["seeds_flagged_per_site"] = {s: sum(s in f for f in row["flagged_no_better_than_baseline"])
                                         for s in SITES}
        row["majority_baseline"] = {s: ps[0]["baseline"].get(s) for s in SITES} if ps else {}
        table[name] = row
    return table


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Personalised >= max(global, alone) in median test accuracy per site (each epsilon present)."""
    out: dict[str, Any] = {}
    for eps, table in summary.items():
        alone = table.get("alone", {})
        for method, reference in (("finetune", "global"), ("ditto", "global"), ("fedper", "global-mlp")):
            if method not in table or reference not in table:
                continue
            per_site = {}
            for site in SITES:
                personal = table[method]["personal"][site]["accuracy"]
                glob = table[reference]["global"][site]["accuracy"]
                al = (alone.get(site) or {}).get("accuracy")
                if personal is None or glob is None:
                    continue
                best = max(glob["median"], al["median"] if al else -1.0)
                per_site[site] = {"personal": personal["median"], "global": glob["median"],
                                  "alone": al["median"] if al else None, "met": personal["median"] >= best}
            met = bool(per_site) and all(v["met"] for v in per_site.values())
            out.setdefault(eps, {})[method] = {"sites": per_site, "met": met}
    return out


def auto_vs_fixed(scored: dict[str, Any]) -> dict[str, Any]:
    """FLamby's metric (mean site accuracy of the final global model), plan = "auto" against the fixed
    batch, per epsilon: medians, their difference and its 90 % bootstrap interval."""
    out = {}
    for eps, entries in scored.items():
        if "auto" not in entries or "global" not in entries:
            continue
        auto = [e["mean_site_accuracy"] for e in entries["auto"]["per_seed"]]
        fixed = [e["mean_site_accuracy"] for e in entries["global"]["per_seed"]]
        low, high = median_difference_interval(auto, fixed)
        out[eps] = {"auto": stats(auto), "fixed": stats(fixed),
                    "difference_of_medians": statistics.median(auto) - statistics.median(fixed),
                    "difference_interval_90": [low, high],
                    "met_2_points": statistics.median(auto) - statistics.median(fixed) >= 0.02}
    return out


def main() -> None:
    """Run (or reuse) the sweeps in order of priority, score every model on each site's test rows,
    print the tables and write benchmarks/results/personalization.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[3.0, 1.0, 8.0])
    parser.add_argument("--plan", nargs="+", default=["3:core", "3:auto", "1:auto", "1:personal",
                                                       "8:personal", "1:core", "8:core"],
                        help="EPS:PART in order of priority; parts: " + ", ".join(PARTS))
    parser.add_argument("--jobs", type=int, default=2, help="sweeps at once")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep sweeps already finished under --work")
    parser.add_argument("--score-only", action="store_true", help="score what is finished, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    work = args.work or Path(tempfile.mkdtemp(prefix="pmfl-persbench-"))
    todo: list[tuple[float, str]] = []
    for item in args.plan:
        eps, part = item.split(":")
        for name in PARTS[part]:
            if (float(eps), name) not in todo and float(eps) in args.epsilons:
                todo.append((float(eps), name))
    walls: dict[str, float] = {}
    if not args.score_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {(e, n): pool.submit(run_sweep, n, e, args.seeds, work, args.reuse) for e, n in todo}
            for key, future in futures.items():
                try:
                    walls[f"eps{key[0]:g}/{key[1]}"] = future.result()
                except subprocess.CalledProcessError as err:
                    print(f"  eps {key[0]:g} {key[1]} failed: {err}", flush=True)
    scored: dict[str, dict[str, Any]] = {}
    for eps, name in todo:
        out = work / f"eps{eps:g}" / name
        if all((out / f"seed-{s}" / "metrics.json").exists() for s in seeds):
            scored.setdefault(f"{eps:g}", {})[name] = score_config(name, eps, seeds, work)
            wall_file = out / "wall_s.txt"
            if wall_file.exists():
                scored[f"{eps:g}"][name]["sweep_wall_s"] = float(wall_file.read_text(encoding="utf-8"))
    summary = {eps: summarise(entries) for eps, entries in scored.items()}
    report(summary)
    command = (f"python -m benchmarks.personalization --seeds {args.seeds} --epsilons "
               + " ".join(f"{e:g}" for e in args.epsilons) + " --plan " + " ".join(args.plan)
               + f" --jobs {args.jobs}" + (f" --work {args.work}" if args.work else "")
               + (" --reuse" if args.reuse else "") + (" --score-only" if args.score_only else ""))
    write_results("personalization", {
        "command": command, "scenario": SCENARIO, "seeds": list(seeds),
        "settings": "heart-disease as shipped (20 rounds, FedAvg, batch 16, 1 local epoch, lr 0.5, "
                    "clip 1.0, delta 1e-5); finetune epochs 1, ditto lambda 0.1, fedper local_layers "
                    "[net.2] with mlp hidden [32]: shipped defaults, nothing tuned",
        "summary": summary, "targets_personal_ge_max_global_alone": targets(summary),
        "auto_vs_fixed": auto_vs_fixed(scored), "runs": scored})


def _fmt(s: dict[str, float] | None) -> str:
    return "-" if not s else f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def report(summary: dict[str, Any]) -> None:
    """Print one table per epsilon: each site's metrics for alone, global and each personal model.

    Args:
        summary: `summarise`'s tables, per epsilon.
    """
    for eps, table in sorted(summary.items(), key=lambda kv: float(kv[0])):
        rows = []
        for site in SITES:
            for metric in METRICS:
                row = [site, metric]
                row.append(_fmt((table.get("alone", {}).get(site) or {}).get(metric)))
                for name, which in (("global", "global"), ("finetune", "personal"), ("ditto", "personal"),
                                    ("global-mlp", "global"), ("fedper", "personal")):
                    entry = table.get(name, {}).get(which, {}).get(site) or {}
                    row.append(_fmt(entry.get(metric)))
                rows.append(row)
        print_table(f"heart-disease, eps {eps}: median (min-max) over seeds, each site's test rows",
                    ["site", "metric", "alone", "global", "finetune", "ditto", "global mlp", "fedper mlp"],
                    rows)
        flamby = [[name, _fmt(table[name]["mean_site_accuracy"]),
                   _fmt(table[name].get("mean_site_accuracy_personal"))]
                  for name in ("global", "auto", "finetune", "ditto", "global-mlp", "fedper")
                  if name in table]
        print_table(f"eps {eps}: FLamby's metric (mean site accuracy)",
                    ["configuration", "global model", "personal models"], flamby)


if __name__ == "__main__":
    main()
