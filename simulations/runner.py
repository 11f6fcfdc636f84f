"""Run a study as a local federation in Flower's Simulation Engine, with the real apps.

The ServerApp and ClientApp are the same objects a deployment runs; this module only prepares
the run directory, checks every site's data up front and starts the engine. Each simulated
hospital keeps its records (privacy state, signed ledger, ledger key, its copies of the run's
rosters) in a directory of its own, laid out as a deployed site's: `RUN/simulated-sites/<site>/`.
They stand for what each hospital keeps on its own disks: an auditor can check the run against
them (`pmfl audit RUN --site RUN/simulated-sites/<site>`), and a resumed run finds them again.
Around the real ClientApp the runner adds one simulation-only mod: the study's poisoned sites, if
any ([simulation] attacks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import app as client_app
from pm_common.study.config import StudyConfig, write_study
from pm_common.study.run_settings import SIMULATED_SITES, RunSettings
from pm_common.tasks import SiteTensors
from pm_common.wire import keys as p
from server.app import coordinator_grid, serve
from server.recorder import ProgressCallback
from simulations.attacks import attack_mod, study_attacks
from simulations.faults import CrashingGrid, crash_round
from simulations.preflight import preflight

log = logging.getLogger("pmfl.simulation")
SITES_DIR = SIMULATED_SITES  # under the run directory: one directory per simulated hospital


class SimulationError(RuntimeError):
    """The simulated study could not run or did not finish."""


def check_sites(study: StudyConfig) -> dict[str, SiteTensors]:
    """Validate every simulated site's data before any process starts (clear errors, early).

    In a real federation each hospital runs this check on its own data (`pmfl site check`); in a
    simulation the researcher holds every file. Returns each site's split (counts are reported).

    Raises:
        SiteDataError: every problem of every site's data, one line each (simulations.preflight).
    """
    return {checked.site.name: checked.data for checked in preflight(study, plans=False)}


def simulated_server_app(
    settings: RunSettings, progress: ProgressCallback | None = None, crash_after: int | None = None
) -> ServerApp:
    """The real coordinator (server.app's `serve`), told the run's settings through its run config,
    as `flwr run --run-config` tells it; `progress` is the simulation-only progress hook, and
    `crash_after` a rehearsed crash (simulations/faults.py)."""
    app = ServerApp()
    config = settings.to_run_config()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(config)
        tuned = coordinator_grid(grid)
        serve(CrashingGrid(tuned, crash_after) if crash_after else tuned, context, on_round=progress)

    return app


def simulated_client_app(study: StudyConfig, settings: RunSettings) -> ClientApp:
    """The real hospital ClientApp, told the run's settings through its run config (which study, and
    where the simulated hospitals keep their records), wrapped in the simulation-only attack mod."""
    app = ClientApp(mods=[attack_mod(study_attacks(study), [s.name for s in study.sites])])
    config = settings.to_run_config()

    def hospital(msg: Message, context: Context) -> Message:
        # Flower's simulation engine keeps a node's run config as registered (empty under
        # run_simulation) and refuses an edited one, so the app gets the node's context with the run
        # config `flwr run` would have fused in; the node's state is the same object.
        told = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                       state=context.state, run_config={**context.run_config, **config})
        return client_app(msg, told)

    app.train()(hospital)
    app.evaluate()(hospital)
    app.query(p.SECAGG_ACTION)(hospital)
    app.query(p.ENROLL_ACTION)(hospital)
    return app


class _FlowerDeprecationNotice(logging.Filter):
    """Drops Flower's notice that `run_simulation` is deprecated, printed twice in every run: pmfl
    knows (the call is kept while Flower 1.42, which pmfl pins, has it), and the user can do nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def prepare_run_dir(out_dir: Path, overwrite: bool, resume: bool = False) -> Path:
    out_dir = Path(out_dir).resolve()
    if resume:
        if not (out_dir / "config.toml").exists():
            raise SimulationError(f"{out_dir} holds no run to resume")
        if (out_dir / "model.pt").exists():
            raise SimulationError(f"the run in {out_dir} has already finished")
        return out_dir
    previous = [out_dir / "privacy", out_dir / "metrics.json", out_dir / "model.pt"]
    if any(path.exists() for path in previous) and not overwrite:
        raise SimulationError(
            f"{out_dir} already holds a run; choose another --out or pass --overwrite "
            "(appending to another run's ledgers would corrupt them)"
        )
    if overwrite:  # nothing of the earlier run may leak into this one: ledgers, keys, states
        for earlier in ("privacy", "checkpoints", "audit", SITES_DIR):
            shutil.rmtree(out_dir / earlier, ignore_errors=True)
        for name in ("metrics.json", "model.pt", "attempts.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def simulate(
    study: StudyConfig,
    out_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    resume: bool = False,
    sites_dir: Path | None = None,
    on_warning: Callable[[str], None] | None = None,
    record_updates_of: str = "",
) -> dict[str, Any]:
    """Run `study` with one simulated SuperNode per site; returns the run's metrics.json.

    Args:
        study: the study, with its simulated [[sites]].
        out_dir: the run directory.
        progress: called after every round (the CLI's live display).
        overwrite: replace an earlier run in `out_dir`.
        verbose: show Flower's and Ray's logs.
        resume: continue an unfinished run in `out_dir` from its last checkpoint, with the simulated
            sites' saved state (their accountants and ledgers carry on; no round runs twice).
        sites_dir: where the simulated hospitals keep their directories (default
            `out_dir`/simulated-sites); the same directory for two runs of a study is a resubmission.
        on_warning: told, before the run starts, of every site that will decline every round (its
            budget, its data) or says it has too little data; logged when None.
        record_updates_of: empirical audit only: the site whose individual updates the coordinator
            keeps (simulations/empirical_audit.py).

    Returns:
        The run's metrics.json.
    """
    warn = on_warning or log.warning
    for checked in preflight(study):  # attackers, data, DP plans: refused here, before any process starts
        if checked.declines:
            warn(f"{checked.site.name}: declines every round: {checked.declines}")
        if checked.warning:
            warn(f"{checked.site.name}: {checked.warning}")
    crash = crash_round(study)
    run_dir = prepare_run_dir(out_dir, overwrite, resume)
    config_path = run_dir / "config.toml"
    write_study(study, config_path)
    settings = RunSettings(
        study=config_path,
        run_dir=run_dir,
        sites_dir=Path(sites_dir).resolve() if sites_dir else run_dir / SITES_DIR,
        resume=resume,
        record_updates_of=record_updates_of,
    )
    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    notice = _FlowerDeprecationNotice()
    flwr_logger.addFilter(notice)
    gpus = 1.0 / len(study.sites) if torch.cuda.is_available() else 0.0
    try:
        run_simulation(
            server_app=simulated_server_app(settings, progress, None if resume else crash),
            client_app=simulated_client_app(study, settings),
            num_supernodes=len(study.sites),
            backend_config={
                # One CPU per site: Ray then runs min(cores, sites) sites at once, each on one
                # thread (Ray sets OMP_NUM_THREADS), which is fastest for small per-site models.
                "client_resources": {"num_cpus": 1, "num_gpus": gpus},
                "init_args": {"log_to_driver": verbose, "configure_logging": verbose},
            },
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.removeFilter(notice)
    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "model.pt").exists() or not metrics_path.exists():
        raise SimulationError(
            f"the simulated study did not finish; see the log above (run dir {run_dir})"
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if not any(r["trained"] or r["declined"] or r["rejected"] for r in metrics["rounds"]):
        failures = [f for r in metrics["rounds"] for f in r["failures"]]
        raise SimulationError(
            "no site completed a single round; first failure: "
            + (failures[0] if failures else "unknown")
        )
    return metrics
