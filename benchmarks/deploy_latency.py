"""Deployed study on one machine, run through the README's commands: wall time and round overhead.

For each configuration, in a fresh directory: `pmfl coordinator pki` + `start`, then for 3 sites
`pmfl site init` / `approve` / `coordinator register` / `site start`, then `pmfl coordinator run`
of a 5-round DP heart-disease study. Measured:
- setup-to-results: from the first `pmfl site init` to the finished run (the README target);
- round wall times, from the checkpoints the ServerApp writes at the end of each round;
- the sites' own work per round without Flower (evaluation + DP training, sequential, as in
  benchmarks/study_time.py), divided by min(cores, sites) that run at once.
Per-round overhead = median round wall - compute per round / parallel workers.

Configurations: `flower-defaults` (Flower's polls: SuperNode 3 s, SuperExec 1 s, HTTP grid 3 s,
and a cold `flwr-clientapp` process per message) and `pmfl` (the shipped defaults: SuperNode
0.5 s, gate 0.1 s, grid 0.1 s, a warm ClientApp process). Both run back to back under the same
machine load; the load average is recorded with them.

    python -m benchmarks.deploy_latency
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
import torch
from torch import nn

from benchmarks.common import median, print_table, write_results
from client.site import load_site_data
from client.training import LocalTraining, predict, train_round
from pm_common.config import SiteSpec, load_study, study_text_for_sites
from pm_common.metrics import binary_metrics
from pm_common.models import build_tabular_model
from pm_common.privacy import plan_study

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "pm_common" / "datasets" / "heart_disease"
STUDY = REPO / "docker" / "studies" / "heart_disease.toml"
SITES = ("cleveland", "hungary", "switzerland")
CONFIGS = {
    "flower-defaults": {
        "env": {"PMFL_GRID_POLL_INTERVAL": "3", "PMFL_GATE_POLL_INTERVAL": "1", "PMFL_GATE_WARM": "0"},
        "poll": 3.0,
    },
    "pmfl": {"env": {}, "poll": 0.5},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pmfl(*args: str, env: dict[str, str], cwd: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pmfl.cli", *args], check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL
    )


def _snapshot(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".*_cache", "artifacts", "results"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def run_config(name: str, root: Path) -> dict:
    """The README flow in `root` under configuration `name`; its timings."""
    config = CONFIGS[name]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **config["env"]}
    port = _free_port()
    app = _snapshot(root / "app")
    study = root / "study.toml"
    study.write_text(tomli_w.dumps(dict(load_study(STUDY).raw)))
    procs: list[subprocess.Popen[bytes]] = []
    log = (root / "processes.log").open("ab")
    try:
        _pmfl("coordinator", "pki", "coord", env=env, cwd=root)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pmfl.cli", "coordinator", "start", "coord", "--port", str(port)],
                env=env,
                cwd=root,
                stdout=log,
                stderr=log,
            )
        )
        start = time.perf_counter()
        for site in SITES:
            _pmfl(
                "site",
                "init",
                f"sites/{site}",
                "--name",
                site,
                "--data",
                str(DATA / f"{site}.csv"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--ca",
                "coord/pki/ca.crt",
                "--study",
                "heart-disease",
                "--runtime-port",
                str(_free_port()),
                env=env,
                cwd=root,
            )
            toml = root / "sites" / site / "site.toml"
            toml.write_text(
                toml.read_text().replace("poll_interval = 0.5", f"poll_interval = {config['poll']}")
            )
            _pmfl("site", "approve", f"sites/{site}", "--app", str(app), env=env, cwd=root)
            _pmfl(
                "coordinator",
                "register",
                "coord",
                f"sites/{site}/keys/site.pub",
                "--name",
                site,
                env=env,
                cwd=root,
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pmfl.cli", "site", "start", f"sites/{site}"],
                    env=env,
                    cwd=root,
                    stdout=log,
                    stderr=log,
                )
            )
        _pmfl(
            "coordinator",
            "run",
            "coord",
            "--study",
            str(study),
            "--out",
            "run",
            "--app",
            str(app),
            "--timeout",
            "900",
            "--expected-sites",
            "3",
            env=env,
            cwd=root,
        )
        total = time.perf_counter() - start
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    stamps = sorted(p.stat().st_mtime for p in (root / "run" / "checkpoints").glob("round-*.pt"))
    # The warm ClientApp processes log the time of the app's own call (data, accounting, training).
    log_text = (root / "processes.log").read_text(errors="replace")
    return {
        "setup_to_results_s": total,
        "round_wall_s": [b - a for a, b in itertools.pairwise(stamps)],
        "clientapp_call_s": [float(m) for m in re.findall(r"\[clientapp\] app ([0-9.]+) s", log_text)],
    }


def site_compute_per_round(rounds: int) -> list[float]:
    """Each site's evaluation + DP training per round, one after another, without Flower."""
    torch.set_num_threads(1)
    study = load_study(STUDY)
    t = study.training
    specs = [SiteSpec(s, DATA / f"{s}.csv", study.privacy) for s in SITES]
    text = study_text_for_sites(study)
    data = [load_site_data(spec, text) for spec in specs]
    plans = [
        plan_study(
            epsilon_budget=3.0,
            delta=1e-5,
            num_examples=len(d.train_y),
            batch_size=t.batch_size,
            local_epochs=t.local_epochs,
            planned_rounds=rounds,
            max_grad_norm=t.max_grad_norm,
        )
        for d in data
    ]
    accountants: list[dict] = [{} for _ in SITES]
    model = build_tabular_model(study.model.name, study.contract.num_inputs)
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i, d in enumerate(data):
            local = build_tabular_model(study.model.name, study.contract.num_inputs)
            local.load_state_dict(model.state_dict())
            binary_metrics(predict(local, d.test_x), d.test_y)
            out = train_round(
                local,
                d.train_x,
                d.train_y,
                nn.BCEWithLogitsLoss(),
                LocalTraining(t.learning_rate, t.batch_size, t.local_epochs),
                plan=plans[i],
                accountant_state=accountants[i],
            )
            accountants[i] = out.accountant
        per_round.append(time.perf_counter() - start)
    return per_round


def main() -> None:
    results: dict[str, dict] = {}
    for name in CONFIGS:
        with tempfile.TemporaryDirectory(prefix=f"pmfl-{name}-") as tmp:
            load_before = os.getloadavg()[0]
            results[name] = run_config(name, Path(tmp))
            results[name]["load_average_1min"] = [load_before, os.getloadavg()[0]]
    rounds = load_study(STUDY).rounds
    compute = site_compute_per_round(rounds)
    workers = min(os.cpu_count() or 1, len(SITES))
    rows = []
    for name, res in results.items():
        res["per_round_overhead_s"] = median(res["round_wall_s"]) - median(compute) / workers
        app = res["clientapp_call_s"]  # only the warm processes log it
        res["per_round_overhead_above_app_s"] = median(res["round_wall_s"]) - median(app) if app else None
        rows.append(
            [
                name,
                res["setup_to_results_s"],
                median(res["round_wall_s"]),
                res["per_round_overhead_s"],
                res["per_round_overhead_above_app_s"],
                f"{res['load_average_1min'][0]:.1f}-{res['load_average_1min'][1]:.1f}",
            ]
        )
    rows.append(["sites' compute per round (3 sequential)", None, median(compute), None, None, None])
    print_table(
        f"Deployed heart-disease study, 3 sites x {rounds} rounds, DP (seconds)",
        [
            "configuration",
            "site init -> results",
            "median round",
            "overhead/round",
            "above app call",
            "load avg",
        ],
        rows,
    )
    write_results(
        "deploy_latency", {"configs": results, "compute_per_round_s": compute, "parallel_workers": workers}
    )


if __name__ == "__main__":
    main()
