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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import app as client_app
from pm_common.study.config import StudyConfig, StudyConfigError, write_study
from pm_common.study.run_settings import SIMULATED_SITES, RunSettings
from pm_common.tasks import SiteTensors
from pm_common.wire import keys as p
from server.app import coordinator_grid, serve, wait_for_sites
from server.enrollment import EnrolledGrid
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


REPLICA_ACTION = "replica"
"""Simulation only: the query that asks a simulated node which of the engine's runs it serves."""
REPLICA_KEY = "replica"  # in a simulated node's node config: the index of the run it serves


def simulated_server_app(
    replicas: Sequence[RunSettings],
    nodes_per_run: int,
    progress: ProgressCallback | None = None,
    crash_after: int | None = None,
    on_run: Callable[[RunSettings], None] | None = None,
) -> ServerApp:
    """The real coordinator (server.app's `serve`), once per run, told each run's settings through
    its run config, as `flwr run --run-config` tells it.

    Args:
        replicas: the runs this engine start serves, one after another (several: a sweep over
            seeds, each on its own simulated nodes; simulations/sweep.py).
        nodes_per_run: simulated nodes (sites) of each run.
        progress: the simulation-only progress hook, told after every round.
        crash_after: a rehearsed crash (simulations/faults.py; one run only).
        on_run: told when a run has finished.

    Returns:
        The ServerApp to hand to Flower's simulation engine.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        tuned = coordinator_grid(grid)
        nodes = nodes_per_run * len(replicas)
        groups = _nodes_by_replica(tuned, len(replicas), nodes) if len(replicas) > 1 else None
        for index, settings in enumerate(replicas):
            run_grid: Grid = tuned if groups is None else EnrolledGrid(tuned, groups.get(index, ()))
            if crash_after:
                run_grid = CrashingGrid(run_grid, crash_after)
            serve(run_grid, _told(context, settings), on_round=progress)
            if on_run is not None:
                on_run(settings)

    return app


def simulated_client_app(study: StudyConfig, replicas: Sequence[RunSettings]) -> ClientApp:
    """The real hospital ClientApp, told its run's settings through its run config (which study, and
    where the simulated hospitals keep their records), wrapped in the simulation-only attack mod.

    Args:
        study: the study (its sites, in partition order, and its simulated attacks).
        replicas: the runs the engine serves; simulated node `i` is site `i % sites` of run
            `i // sites`.

    Returns:
        The ClientApp to hand to Flower's simulation engine.
    """
    sites = len(study.sites)

    def tell(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        replica, partition = divmod(int(context.node_config.get("partition-id", 0)), sites)
        node_config = {**context.node_config, "partition-id": partition, REPLICA_KEY: replica}
        return call_next(msg, _told(context, replicas[replica], node_config))

    app = ClientApp(mods=[tell, attack_mod(study_attacks(study), [s.name for s in study.sites])])

    def hospital(msg: Message, context: Context) -> Message:
        return client_app(msg, context)

    app.train()(hospital)
    app.evaluate()(hospital)
    app.query(p.SECAGG_ACTION)(hospital)
    app.query(p.ENROLL_ACTION)(hospital)

    @app.query(REPLICA_ACTION)
    def replica(msg: Message, context: Context) -> Message:
        index = int(context.node_config[REPLICA_KEY])
        return Message(RecordDict({REPLICA_KEY: ConfigRecord({REPLICA_KEY: index})}), reply_to=msg)

    return app


def _told(context: Context, settings: RunSettings, node_config: UserConfig | None = None) -> Context:
    """`context` with the run config `flwr run` would have fused in for `settings`.

    Why a copy: Flower's simulation engine keeps a node's run config as registered (empty under
    run_simulation) and refuses an edited one; the node's state is the same object, so what the app
    keeps there persists.
    """
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config if node_config is None else node_config,
        state=context.state,
        run_config={**context.run_config, **settings.to_run_config()},
    )


def _nodes_by_replica(
    grid: Grid, replicas: int, expected: int, timeout: float = 300.0
) -> dict[int, list[int]]:
    """Which simulated nodes serve which run: one query to each node (simulation only)."""
    wait_for_sites(grid, expected, timeout)  # the engine registers its nodes as the ServerApp starts
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=node, message_type=f"query.{REPLICA_ACTION}")
                for node in nodes]
    groups: dict[int, list[int]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise SimulationError(f"a simulated node did not say which run it serves: {reply.error.reason}")
        index = int(reply.content.config_records[REPLICA_KEY][REPLICA_KEY])
        groups.setdefault(index, []).append(reply.metadata.src_node_id)
    if sorted(groups) != list(range(replicas)):
        raise SimulationError(f"the simulated nodes serve runs {sorted(groups)}, expected 0..{replicas - 1} "
                              f"({len(nodes)} nodes asked)")
    return groups


class _FlowerDeprecationNotice(logging.Filter):
    """Drops Flower's notice that `run_simulation` is deprecated, printed twice in every run: pmfl
    knows (the call is kept while Flower 1.42, which pmfl pins, has it), and the user can do nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def prepare_run_dir(out_dir: Path, overwrite: bool, resume: bool = False) -> Path:
    """The run directory, ready for a new run (or checked for one to resume).

    Why so careful: appending to another run's ledgers would corrupt them, so an earlier run is
    only replaced when asked, and then nothing of it (ledgers, keys, states) is left behind.

    Args:
        out_dir: the run directory.
        overwrite: replace an earlier run there.
        resume: continue the unfinished run there.

    Returns:
        The directory, resolved.

    Raises:
        SimulationError: it holds a run and neither `overwrite` nor `resume` says what to do, or
            there is nothing (or nothing unfinished) to resume.
    """
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
    if resume and study.personalization.local_layers:  # refused before anything starts, in one line
        raise StudyConfigError("--resume: resuming a fedper run is not supported yet; start a new run")
    warn_before_start(study, on_warning)
    run_dir = prepare_run_dir(out_dir, overwrite, resume)
    settings = run_settings(study, run_dir, sites_dir, resume=resume, record_updates_of=record_updates_of)
    run_engine(study, [settings], progress=progress, crash_after=None if resume else crash_round(study),
               verbose=verbose)
    return finished_metrics(run_dir)


def warn_before_start(study: StudyConfig, on_warning: Callable[[str], None] | None = None) -> None:
    """Check every site's data and DP plan (refused here, before any process starts) and warn of
    every site that will decline every round or has too little data.

    Args:
        study: the study.
        on_warning: told each warning; logged when None.

    Raises:
        SiteDataError: every problem of every site's data, one line each.
    """
    warn = on_warning or log.warning
    for checked in preflight(study):
        if checked.declines:
            warn(f"{checked.site.name}: declines every round: {checked.declines}")
        if checked.warning:
            warn(f"{checked.site.name}: {checked.warning}")


def run_settings(
    study: StudyConfig,
    run_dir: Path,
    sites_dir: Path | None = None,
    *,
    resume: bool = False,
    record_updates_of: str = "",
) -> RunSettings:
    """The settings of one simulated run in `run_dir`, with its study written there (config.toml).

    Args:
        study: the study of the run.
        run_dir: the (prepared) run directory.
        sites_dir: where the simulated hospitals keep their directories (default
            `run_dir`/simulated-sites).
        resume: the run continues from its last checkpoint.
        record_updates_of: empirical audit only: the site whose individual updates are kept.

    Returns:
        What the apps are told through their run config.
    """
    config_path = run_dir / "config.toml"
    write_study(study, config_path)
    return RunSettings(
        study=config_path,
        run_dir=run_dir,
        sites_dir=Path(sites_dir).resolve() if sites_dir else run_dir / SITES_DIR,
        resume=resume,
        record_updates_of=record_updates_of,
    )


def run_engine(
    study: StudyConfig,
    replicas: Sequence[RunSettings],
    *,
    progress: ProgressCallback | None = None,
    crash_after: int | None = None,
    verbose: bool = False,
    on_run: Callable[[RunSettings], None] | None = None,
) -> None:
    """One start of Flower's simulation engine for the runs `replicas` of `study`, one after another.

    Why several runs in one start: starting the engine and importing the apps in each of its
    workers costs seconds, often more than a small study's training; a sweep over seeds pays it once.
    Each run has simulated nodes of its own (one per site), so no state passes between runs.

    Args:
        study: the study (its sites; the replicas differ only in what their settings name).
        replicas: the runs' settings.
        progress: told after every round (the CLI's live display).
        crash_after: a rehearsed coordinator crash (simulations/faults.py; one run only).
        verbose: show Flower's and Ray's logs.
        on_run: told when each run has finished.
    """
    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    notice = _FlowerDeprecationNotice()
    flwr_logger.addFilter(notice)
    nodes = len(study.sites) * len(replicas)
    gpus = 1.0 / nodes if torch.cuda.is_available() else 0.0
    try:
        run_simulation(
            server_app=simulated_server_app(replicas, len(study.sites), progress, crash_after, on_run),
            client_app=simulated_client_app(study, replicas),
            num_supernodes=nodes,
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


def finished_metrics(run_dir: Path) -> dict[str, Any]:
    """The metrics.json of a run that finished.

    Raises:
        SimulationError: the run did not finish, or no site completed a single round.
    """
    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "model.pt").exists() or not metrics_path.exists():
        raise SimulationError(
            f"the simulated study did not finish; see the log above (run dir {run_dir})"
        )
    metrics: dict[str, Any] = json.loads(metrics_path.read_text(encoding="utf-8"))
    if not any(r["trained"] or r["declined"] or r["rejected"] for r in metrics["rounds"]):
        failures = [f for r in metrics["rounds"] for f in r["failures"]]
        raise SimulationError(
            "no site completed a single round; first failure: "
            + (failures[0] if failures else "unknown")
        )
    return metrics
