"""The coordinator's ServerApp: run the study's rounds, keep every site's report, save the model.

The same app runs in the Simulation Engine (`pmfl simulate`, `flwr run .`) and deployed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from pm_common import flower_patches
from pm_common.study.config import StudyConfig, load_study, study_text_for_sites
from pm_common.tasks import task_of
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.enrollment import EnrolledGrid, enroll_sites, load_signed_roster
from server.grid import PollingGrid
from server.recorder import ProgressCallback, RunRecorder
from server.resume import RESUME_ENV, resume_study, strategy_state
from server.secagg_unmasking import SecureAggregation
from server.strategy import SiteReportingStrategy, build_strategy, model_content

log = logging.getLogger("pmfl.server")
STUDY_ENV = "PMFL_STUDY"
RUN_DIR_ENV = "PMFL_RUN_DIR"
ROUND_TIMEOUT_ENV = "PMFL_ROUND_TIMEOUT"
SIMULATION_PULL_INTERVAL = 0.01  # seconds; Flower's default 0.1 s adds up to 0.1 s per exchange

app = ServerApp()
_progress: ProgressCallback | None = None


def set_progress_callback(callback: ProgressCallback | None) -> None:
    """Let a front end (the CLI's live display) follow the rounds of an in-process run."""
    global _progress
    _progress = callback


def resolve_run(run_config: Mapping[str, object]) -> tuple[Path, Path]:
    """Study file and run directory: `flwr run --run-config` first, then the pmfl runner's env."""
    study = str(run_config.get("study", "") or os.environ.get(STUDY_ENV, ""))
    if not study:
        raise ValueError(
            f"no study configured: pass --run-config \"study='STUDY.toml'\" or set {STUDY_ENV}"
        )
    run_dir = str(os.environ.get(RUN_DIR_ENV, "") or run_config.get("run-dir", "") or "runs/latest")
    return Path(study), Path(run_dir)


def train_config(
    study: StudyConfig, study_text: str, planned_sites: int, run: str, attempt: int
) -> ConfigRecord:
    """What every site receives with the model: the study (contract, model, training), the round
    plan, and the run and attempt its ledger line records."""
    return ConfigRecord({
        p.NUM_ROUNDS: study.rounds,
        p.STUDY_TOML: study_text,
        p.PLANNED_SITES: planned_sites,
        p.RUN: run,
        p.ATTEMPT: attempt,
    })


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> int:
    """Wait until `expected` sites are online (or `timeout` passes); returns how many are.

    Deployed sites connect at their own pace: without this, round 1 would sample only the sites
    online at the moment the run starts. Later rounds sample whoever is online, so a site that
    drops out (Flower marks it offline when its heartbeats stop) does not stall the study.
    """
    deadline = time.monotonic() + timeout
    while (online := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    log.info("%d of %d expected sites online at the start of the study", online, expected)
    return online


def run_study(
    grid: Grid,
    study: StudyConfig,
    run_dir: Path,
    round_timeout: float = 3600.0,
    expected_sites: int = 0,
    resume: bool = False,
) -> dict:
    """Enrol the sites connected to `grid` and run all rounds of `study`; returns metrics.json's content.

    `expected_sites` (deployment only; 0 means [strategy] min_sites) is how many sites to wait for
    before round 1. `resume`: continue the run in `run_dir` from its last checkpoint (server/resume.py).
    """
    study_text = study_text_for_sites(study)
    task = task_of(study)
    model = task.build_model(study, study.seed)
    meta = {"study": study.name, "task": task.name, **task.describe_model(study)}
    if not resume and load_signed_roster(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run: resume it, or choose another run directory")
    recorder = RunRecorder(run_dir, study, meta, on_round=_progress)
    attempt = recorder.begin_attempt()
    if not study.sites:  # deployment: sites connect at their own pace
        wait_for_sites(grid, expected_sites or study.strategy.min_sites, round_timeout)
    enrolled = enroll_sites(grid, study, study_text, recorder, attempt, round_timeout)
    grid = EnrolledGrid(grid, enrolled.nodes)
    # simulation: every enrolled site, every round; deployment: go on while min_sites remain
    num_sites = len(enrolled.nodes) if study.sites else min(study.strategy.min_sites, len(enrolled.nodes))
    inner = build_strategy(study.strategy, num_sites)
    strategy = SiteReportingStrategy(
        inner,
        recorder,
        min_sites=study.strategy.min_sites,
        max_update_norm=study.strategy.max_update_norm,
        round_offset=resume_study(run_dir, enrolled.roster.run, model, inner, recorder) if resume else 0,
        secure=(
            SecureAggregation(study.secure_aggregation, recorder.record_failure, study=study.name,
                              run=enrolled.roster.run, sites=enrolled.nodes, study_text=study_text,
                              roster_size=len(enrolled.roster.sites))
            if study.secure_aggregation.enabled
            else None
        ),
    )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            recorder.checkpoint(server_round, arrays.to_torch_state_dict(), strategy_state(inner))
        return None

    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=study.rounds,
        timeout=round_timeout,
        train_config=train_config(study, study_text, num_sites, enrolled.roster.run, attempt),
        evaluate_fn=checkpoint,
    )
    final = result.arrays if result.arrays else ArrayRecord(model.state_dict())
    _final_evaluation(grid, final, study, study_text, recorder, round_timeout, enrolled.roster.run, attempt)
    metrics = recorder.finish(final.to_torch_state_dict())
    log.info(
        "study %s finished in %.1fs; results in %s",
        study.name,
        time.perf_counter() - started,
        run_dir,
    )
    return metrics


def _final_evaluation(
    grid: Grid,
    arrays: ArrayRecord,
    study: StudyConfig,
    study_text: str,
    recorder: RunRecorder,
    timeout: float,
    run: str,
    attempt: int,
) -> None:
    """Every site evaluates the final model on its own test rows (training rounds carried the rest)
    and closes its ledger for the run; the run's copies are completed from the sites' ledgers."""
    config = ConfigRecord({
        p.SERVER_ROUND: study.rounds,
        p.STUDY_TOML: study_text,
        p.RUN: run,
        p.ATTEMPT: attempt,
        p.CLOSE: True,
    })
    content = model_content(arrays, config)
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            recorder.record_failure(study.rounds, f"final evaluation: node {node}: {reply.error.reason}")
            continue
        site = str(reply.content[p.SITE][p.SITE_NAME])
        lines = reply.content[p.SITE].get(p.LEDGER_LINES)
        if lines:
            recorder.reconcile_ledger(site, [str(line) for line in lines])
        metrics = reply.content.metric_records.get(p.TRAIN_METRICS)
        evaluation = wire.split_metrics(metrics)[1] if metrics is not None else None
        if evaluation is not None:
            recorder.record_evaluation(study.rounds, site, evaluation)


def coordinator_grid(grid: Grid) -> Grid:
    """Flower's grid, tuned for where the coordinator runs (see server/grid.py and
    pm_common/flower_patches.py for why each wait is shortened)."""
    if isinstance(grid, HttpGrid):  # deployed: collect replies without Flower's fixed 3 s waits
        return PollingGrid(grid)
    if isinstance(grid, InMemoryGrid):  # simulated: poll replies every 10 ms, not 100 ms
        flower_patches.set_simulation_pull_interval(grid, SIMULATION_PULL_INTERVAL)
    return grid


def serve(grid: Grid, context: Context) -> None:
    """Run the study the run config names, over `grid` (already tuned: `coordinator_grid`)."""
    study_path, run_dir = resolve_run(context.run_config)
    study = load_study(study_path)
    torch.manual_seed(study.seed)
    timeout = float(os.environ.get(ROUND_TIMEOUT_ENV, "3600"))
    resume = bool(context.run_config.get("resume", False)) or os.environ.get(RESUME_ENV) == "1"
    run_study(
        grid, study, run_dir, timeout, int(context.run_config.get("expected-sites", 0) or 0), resume
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(coordinator_grid(grid), context)
