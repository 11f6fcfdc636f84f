"""Deployed study on one machine, run through the README's commands: wall time and round overhead.

For each configuration, in a fresh directory: `pmfl coordinator pki` + `start`, then for 3 sites
`pmfl site init` / `approve` / `coordinator register` / `site start`, then `pmfl coordinator run`
of a 5-round DP heart-disease study. Measured:
- setup-to-results: from the first `pmfl site init` to the finished run (the README target);
- round wall times, from the checkpoints the ServerApp writes at the end of each round;
- the ClientApp calls (each warm task logs `[clientapp] app ... s`: data, accounting, training);
- the sites' own work per round without Flower (evaluation + DP training, sequential, as in
  benchmarks/study_time.py), divided by min(cores, sites) that run at once;
- CPU seconds per round, from /proc: of the processes this benchmark started (the deployment, and
  per role: SuperLink, SuperNodes, ClientApp tasks, ServerApp, gates) and of every other process on
  the machine (other users' jobs share its cores);
- the SuperLink's requests per round, by API path (its request trace, `PMFL_TRACE_REQUESTS`): every
  object of a message is one HTTPS request, and the SuperLink's CPU per request sets a round's pace.
Per-round overhead = median round wall - compute per round / parallel workers; "above the slowest
app call" = each round's wall time minus the longest ClientApp call of that round, median.

Configurations: `flower-defaults` (Flower's waits: SuperNode 3 s idle poll and 0.5 s local waits,
SuperExec 1 s, HTTP grid 3 s, a cold `flwr-clientapp` process per message) and `pmfl` (the shipped
defaults: SuperNode 0.5 s, gate 0.1 s, grid 0.1 s, a warm ClientApp process, sooner retries of
message contents). They run back to back; the load average is recorded with each run.

`--baseline DIR` also runs each configuration with the code of another checkout (e.g. `git archive`
of main), labelled `CONFIG@baseline`, alternating with this checkout's runs: an A/B under the same
machine load (every process it starts imports DIR's code, and the sites install DIR's app).

    python -m benchmarks.deploy_latency [--configs pmfl] [--repeat 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w
import torch
from torch import nn

from benchmarks.common import median, print_table, write_results
from client.site import load_site_data
from client.training import LocalTraining, predict, train_round
from pm_common.models.tabular import build_tabular_model
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import SiteSpec, load_study, study_text_for_sites
from pm_common.tasks.metrics import binary_metrics

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


def _snapshot(dest: Path, repo: Path = REPO) -> Path:
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".*_cache", "artifacts", "results"
    )
    shutil.copytree(repo, dest, ignore=ignore)
    return dest


class CpuSampler:
    """CPU ticks of every process, sampled from /proc every `interval` seconds in a thread.

    Why: the machine is shared, so a round's wall time alone mixes this deployment's work with
    other users' jobs; the CPU each side used per round says how much of the wall time was ours.
    Short-lived processes count up to their last sample (the forked ClientApp tasks live ~1 s).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.parents: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            ticks: dict[int, int] = {}
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as fh:
                        fields = fh.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                pid = int(entry.name)
                self.parents.setdefault(pid, int(fields[1]))
                if pid not in self.commands:
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                            self.commands[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        self.commands[pid] = ""
                ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
            self.samples.append((time.time(), ticks))

    def cpu_seconds(self, start: float, end: float) -> tuple[float, float, dict[str, float]]:
        """CPU seconds used in [start, end] by this process's descendants, by all others, and
        by the descendants per role (SuperLink, SuperNodes, ClientApp tasks, ...)."""
        window = [ticks for t, ticks in self.samples if start <= t <= end]
        if len(window) < 2:
            return float("nan"), float("nan"), {}
        first, peak = window[0], {}
        for ticks in window:
            for pid, value in ticks.items():
                peak[pid] = max(peak.get(pid, 0), value)
        ours = others = 0.0
        roles: dict[str, float] = {}
        for pid, value in peak.items():
            used = (value - first.get(pid, 0)) / os.sysconf("SC_CLK_TCK")
            if self._descends(pid):
                ours += used
                role = _role(self.commands.get(pid, ""))
                roles[role] = roles.get(role, 0.0) + used
            else:
                others += used
        return ours, others, roles

    def _descends(self, pid: int) -> bool:
        me = os.getpid()
        while pid > 1:
            pid = self.parents.get(pid, 0)
            if pid == me:
                return True
        return False


ROLES = (  # command-line marker -> role, first match wins (SuperLink and SuperNodes name each other)
    ("warm_worker", "ClientApp tasks"),
    ("flwr-clientapp", "ClientApp tasks"),
    ("client.deploy.gate", "site gates"),
    ("flwr-serverapp", "ServerApp"),
    ("server.deploy.superlink", "SuperLink"),
    ("flower-superlink", "SuperLink"),
    ("supernode", "SuperNodes"),
)


def _role(command: str) -> str:
    return next((role for marker, role in ROLES if marker in command), "other (CLI, SuperExec)")


def _requests_per_round(trace: Path, stamps: list[float]) -> list[dict[str, int]]:
    """The SuperLink's requests between consecutive checkpoints, counted by API path."""
    if not trace.exists():
        return []
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    counts = []
    for a, b in itertools.pairwise(stamps):
        kinds: dict[str, int] = {}
        for row in rows:
            if a <= row["t"] < b:
                kind = row["path"].removeprefix("/v1/")
                kinds[kind] = kinds.get(kind, 0) + 1
        counts.append(dict(sorted(kinds.items(), key=lambda kv: -kv[1])))
    return counts


def run_config(name: str, root: Path, sampler: CpuSampler | None = None, repo: Path = REPO) -> dict:
    """The README flow in `root` under configuration `name`, with the code of `repo`; its timings."""
    config = CONFIGS[name]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # 3 sites share 2 cores here: one torch thread each, as if each had its own machine (with
        # more threads than free cores, a tiny model's step takes milliseconds instead of 40 us).
        "OMP_NUM_THREADS": "1",
        # The SuperLink writes one line per request (server/deploy/superlink.py): requests per round.
        "PMFL_TRACE_REQUESTS": str(root / "requests.jsonl"),
        **config["env"],
    }
    port = _free_port()
    app = _snapshot(root / "app", repo)
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
    calls = [float(m) for m in re.findall(r"\[clientapp\] app ([0-9.]+) s", log_text)]
    walls = [b - a for a, b in itertools.pairwise(stamps)]
    result = {
        "setup_to_results_s": total,
        "round_wall_s": walls,
        "clientapp_call_s": calls,
        # Round k+1 (between checkpoints k and k+1) waits for its slowest site; the calls come in
        # groups of one per site and round (no site fails in this benchmark).
        "round_above_slowest_app_s": [
            wall - max(calls[(k + 1) * len(SITES) : (k + 2) * len(SITES)])
            for k, wall in enumerate(walls)
            if len(calls) >= (k + 2) * len(SITES)
        ],
    }
    requests = _requests_per_round(root / "requests.jsonl", stamps)
    if requests:
        result["requests_per_round"] = [sum(r.values()) for r in requests]
        result["requests_by_kind_per_round"] = requests
    if sampler is not None and len(stamps) > 1:
        ours, others, roles = sampler.cpu_seconds(stamps[0], stamps[-1])
        result["cpu_s_per_round"] = {
            "deployment": ours / len(walls),
            "other_processes": others / len(walls),
            "by_role": {role: used / len(walls) for role, used in sorted(roles.items())},
        }
    return result


def _describe(repo: Path) -> str:
    """Which code a run used: the checkout's commit (and `+changes` if it has uncommitted ones)."""
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return str(repo)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


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


def main(argv: list[str] | None = None) -> None:
    """Run each configuration's deployment, print the summary table and write every run's measurements.

    With `--baseline`, the baseline checkout's run alternates with this checkout's, so both meet the same
    machine load. The sites' compute per round is measured once, after the deployments.
    Writes benchmarks/results/deploy_latency.json.

    Args:
        argv: the command-line arguments (None: sys.argv).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration")
    parser.add_argument("--baseline", type=Path, help="checkout whose code to run alternately (A/B)")
    args = parser.parse_args(argv)
    variants = [(name, REPO) for name in args.configs]
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        variants = [v for name in args.configs for v in ((f"{name}@baseline", baseline), (name, REPO))]
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    with CpuSampler() as sampler:
        for _ in range(args.repeat):
            for label, repo in variants:
                name = label.removesuffix("@baseline")
                with tempfile.TemporaryDirectory(prefix=f"pmfl-{name}-") as tmp:
                    load_before = os.getloadavg()[0]
                    res = run_config(name, Path(tmp), sampler, repo)
                    res["load_average_1min"] = [load_before, os.getloadavg()[0]]
                    res["code"] = _describe(repo)
                    runs[label].append(res)
    rounds = load_study(STUDY).rounds
    compute = site_compute_per_round(rounds)
    workers = min(os.cpu_count() or 1, len(SITES))
    rows, summary = [], {}
    for name, results in runs.items():
        walls = [w for r in results for w in r["round_wall_s"]]
        above = [w for r in results for w in r["round_above_slowest_app_s"]]
        apps = [c for r in results for c in r["clientapp_call_s"]]  # only the warm processes log it
        cpu = [r["cpu_s_per_round"] for r in results if "cpu_s_per_round" in r]
        loads = [x for r in results for x in r["load_average_1min"]]
        requests = [n for r in results for n in r.get("requests_per_round", [])]
        roles = sorted({role for c in cpu for role in c.get("by_role", {})})
        summary[name] = {
            "runs": len(results),
            "median_setup_to_results_s": median([r["setup_to_results_s"] for r in results]),
            "median_round_wall_s": median(walls),
            "per_round_overhead_s": median(walls) - median(compute) / workers,
            "per_round_overhead_above_app_s": median(walls) - median(apps) if apps else None,
            "median_round_above_slowest_app_s": median(above) if above else None,
            "deployment_cpu_s_per_round": median([c["deployment"] for c in cpu]) if cpu else None,
            "other_processes_cpu_s_per_round": median([c["other_processes"] for c in cpu]) if cpu else None,
            "deployment_cpu_s_per_round_by_role": {
                role: median([c["by_role"].get(role, 0.0) for c in cpu if "by_role" in c]) for role in roles
            },
            "median_requests_per_round": median(requests) if requests else None,
            "load_average_1min_range": [min(loads), max(loads)],
        }
        row = summary[name]
        rows.append([
            name,
            row["median_setup_to_results_s"],
            row["median_round_wall_s"],
            row["per_round_overhead_s"],
            row["median_round_above_slowest_app_s"],
            row["deployment_cpu_s_per_round"],
            row["deployment_cpu_s_per_round_by_role"].get("SuperLink"),
            row["other_processes_cpu_s_per_round"],
            row["median_requests_per_round"],
            f"{min(loads):.1f}-{max(loads):.1f}",
        ])
    rows.append(["sites' compute per round (3 sequential)", None, median(compute), *[None] * 7])
    print_table(
        f"Deployed heart-disease study, 3 sites x {rounds} rounds, DP, {args.repeat} run(s) each (seconds)",
        [
            "configuration",
            "site init -> results",
            "median round",
            "overhead/round",
            "above slowest app",
            "CPU/round: ours",
            "of it SuperLink",
            "others'",
            "requests/round",
            "load avg",
        ],
        rows,
    )
    write_results(
        "deploy_latency",
        {"summary": summary, "runs": runs, "compute_per_round_s": compute, "parallel_workers": workers},
    )


if __name__ == "__main__":
    main()
