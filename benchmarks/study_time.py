"""Wall time of the default study (4 sites x 20 rounds, DP) and its per-round overhead.

1. `pmfl simulate heart-disease` as a user runs it, timed end to end (imports, Ray, all rounds).
2. The same study in-process, with the time of each round taken from the live-progress hook.
3. The same local work without Flower: each site's evaluation and DP training for every round,
   one site after another, through the same functions the ClientApp calls.
Per-round overhead = median round wall time - pure compute per round / parallel workers
(min(cores, sites) sites train at once in the Simulation Engine).

    python -m benchmarks.study_time
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median, print_table, write_results
from client.training import LocalTraining, predict, train_round
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import load_study
from pm_common.tasks import task_of
from simulations.runner import simulate
from simulations.scenarios import scenario_path


def cli_wall_time(out: Path) -> float:
    """Time `pmfl simulate heart-disease` end to end, as a user runs it, in a fresh Python process.

    A subprocess includes what a user waits for (interpreter start, imports, Ray, every round, the final
    evaluation); Flower's telemetry and update check are off so no network call adds to it.

    Args:
        out: the run directory passed as `--out`.

    Returns:
        The command's wall time in seconds.
    """
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pmfl.cli", "simulate", "heart-disease", "--out", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def round_times(out: Path) -> list[float]:
    """Wall time of each round of the default study, run in this process.

    The live-progress hook is told at the end of every round; the time between consecutive ends is
    a round's wall time without the process start, so round 1 (which also pays the engine's
    start-up) is not among them.

    Args:
        out: the run directory.

    Returns:
        Seconds per round, rounds 2 onwards.
    """
    stamps: list[float] = []
    study = load_study(scenario_path("heart-disease"))
    simulate(study, out, progress=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def pure_compute_per_round(study_path: Path | None = None) -> list[float]:
    """The sites' own work per round (evaluate + DP train), sequential, without Flower or Ray: what
    a round would cost if coordination were free, the baseline the overheads are measured against.

    Args:
        study_path: the study (default: the built-in heart-disease study).

    Returns:
        Seconds per round, all sites one after another.
    """
    torch.set_num_threads(1)
    study = load_study(study_path or scenario_path("heart-disease"))
    t = study.training
    task = task_of(study)
    sites = [task.load_site(site, study) for site in study.sites]
    plans = [
        plan_study(epsilon_budget=3.0, delta=1e-5, num_examples=len(d.train_y), batch_size=t.batch_size,
                   local_epochs=t.local_epochs, planned_rounds=study.rounds, max_grad_norm=t.max_grad_norm)
        for d in sites
    ]
    accountants: list[dict] = [{} for _ in sites]
    model = task.build_model(study)
    per_round = []
    for _ in range(study.rounds):
        start = time.perf_counter()
        for i, data in enumerate(sites):
            local = task.build_model(study)
            local.load_state_dict(model.state_dict())
            task.metrics(predict(local, data.test_x), data.test_y)
            out = train_round(local, data.train_x, data.train_y, task.criterion(),
                              LocalTraining(t.learning_rate, t.batch_size, t.local_epochs),
                              plan=plans[i], accountant_state=accountants[i])
            accountants[i] = out.accountant
        per_round.append(time.perf_counter() - start)
    return per_round


def main() -> None:
    """Measure the default study's wall time and its per-round overhead, print the table, write the results.

    Runs the CLI end to end, the same study in-process for its round times, and the sites' pure compute;
    the overhead is the median round wall time minus the compute per round divided by the sites that
    train at once (min(cores, 4)). Writes benchmarks/results/study_time.json.
    """
    with tempfile.TemporaryDirectory() as tmp:
        wall = cli_wall_time(Path(tmp) / "cli")
        rounds = round_times(Path(tmp) / "inproc")
    compute = pure_compute_per_round()
    workers = min(os.cpu_count() or 1, 4)
    overhead = median(rounds) - median(compute) / workers
    rows = [["pmfl simulate heart-disease (CLI, end to end)", wall],
            ["median round wall time", median(rounds)],
            ["median pure compute per round (4 sites sequential)", median(compute)],
            [f"per-round overhead (round wall - compute/{workers})", overhead],
            ["startup + final evaluation (wall - 20 rounds)", wall - sum(rounds) - median(rounds)]]
    print_table("Default study: 4 sites x 20 rounds, DP-SGD (seconds)", ["measure", "s"], rows)
    write_results("study_time", {"cli_wall_s": wall, "round_wall_s": rounds, "compute_per_round_s": compute,
                                 "parallel_workers": workers, "per_round_overhead_s": overhead})


if __name__ == "__main__":
    main()
