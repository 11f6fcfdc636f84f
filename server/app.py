"""The coordinator's ServerApp: run the study's rounds, keep every site's report, save the model.

The same app runs in the Simulation Engine (`pmfl simulate`, `flwr run .`) and deployed.
"""

from __future__ import annotations

import functools
import logging
import time

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
from pm_common.models.layers import shared_part
from pm_common.study.config import StudyConfig, StudyConfigError, load_study, study_text_for_sites
from pm_common.study.run_settings import RunSettings
from pm_common.tasks import task_of
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.enrollment import EnrolledGrid, enroll_sites, load_signed_roster
from server.grid import PollingGrid
from server.recorder import ProgressCallback, RunRecorder
from server.resume import resume_study, strategy_state
from server.secagg_unmasking import SecureAggregation
from server.strategies import build_strategy, coordinator_strategy

log = logging.getLogger("pmfl.server")
SIMULATION_PULL_INTERVAL = 0.01  # seconds; Flower's default 0.1 s adds up to 0.1 s per exchange

app = ServerApp()


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
    settings: RunSettings,
    on_round: ProgressCallback | None = None,
) -> dict:
    """Enrol the sites connected to `grid` and run all rounds of `study`; returns metrics.json's content.

    Args:
        grid: the coordinator's grid (already tuned: `coordinator_grid`).
        study: the study.
        settings: the run's settings (run directory, resume, expected sites, timeout).
        on_round: simulation only: told after every round (the CLI's live display).

    Returns:
        metrics.json's content.

    Raises:
        ValueError: the run directory holds a run and `settings.resume` is not set.
        EnrollmentError: no site enrolled.
    """
    run_dir, resume, round_timeout = settings.run_dir, settings.resume, settings.round_timeout
    study_text = study_text_for_sites(study)
    task = task_of(study)
    model = task.build_model(study, study.seed)
    meta = {"study": study.name, "task": task.name, **task.describe_model(study)}
    shared = functools.partial(shared_part, local_layers=study.personalization.local_layers)
    if resume and study.personalization.local_layers:
        raise StudyConfigError("resuming a fedper run is not supported yet: start a new run")
    if not resume and load_signed_roster(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run: resume it, or choose another run directory")
    recorder = RunRecorder(run_dir, study, meta, on_round, record_updates_of=settings.record_updates_of)
    attempt = recorder.begin_attempt()
    if not study.sites:  # deployment: sites connect at their own pace
        wait_for_sites(grid, settings.expected_sites or study.strategy.min_sites, round_timeout)
    enrolled = enroll_sites(grid, study, study_text, recorder, attempt, round_timeout)
    grid = EnrolledGrid(grid, enrolled.nodes)
    # simulation: every enrolled site, every round; deployment: go on while min_sites remain
    num_sites = len(enrolled.nodes) if study.sites else min(study.strategy.min_sites, len(enrolled.nodes))
    inner = build_strategy(study.strategy, num_sites)
    secure = None
    if study.secure_aggregation.enabled:
        secure = SecureAggregation(study.secure_aggregation, recorder.record_failure, study=study.name,
                                   run=enrolled.roster.run, sites=enrolled.nodes, study_text=study_text,
                                   roster_size=len(enrolled.roster.sites))
        secure.timeout, secure.last_round = round_timeout, study.rounds
    strategy = coordinator_strategy(
        inner,
        recorder,
        min_sites=study.strategy.min_sites,
        max_update_norm=study.strategy.max_update_norm,
        round_offset=resume_study(run_dir, enrolled.roster.run, model, inner, recorder) if resume else 0,
        secure=secure,
    )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            recorder.checkpoint(server_round, arrays.to_torch_state_dict(), strategy_state(inner))
        return None

    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(shared(model.state_dict())),  # fedper: the local layers stay at the sites
        num_rounds=study.rounds,
        timeout=round_timeout,
        train_config=train_config(study, study_text, num_sites, enrolled.roster.run, attempt),
        evaluate_fn=checkpoint,
    )
    final = result.arrays if result.arrays else ArrayRecord(shared(model.state_dict()))
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
    """Every site evaluates the final model on its own test rows (training rounds carried the rest),
    trains its personal model when the study asks for one (client/personalization.py: the site
    spends its own reserved steps, reports the metrics and where the model lies, sends no model),
    and closes its ledger for the run; the run's copies are completed from the sites' ledgers."""
    config = ConfigRecord({
        p.SERVER_ROUND: study.rounds,
        p.STUDY_TOML: study_text,
        p.RUN: run,
        p.ATTEMPT: attempt,
        p.CLOSE: True,
    })
    content = wire.model_content({name: a.numpy() for name, a in arrays.items()}, config)
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
        if study.personalization.enabled:
            personal = reply.content.metric_records.get(p.PERSONAL_METRICS)
            record = reply.content[p.SITE]
            recorder.record_personal(
                site,
                None if study.personalization.local_layers else evaluation,  # fedper: no whole global model
                wire.split_metrics(personal)[1] if personal is not None else None,
                str(record.get(p.PERSONAL_MODEL, "")),
                str(record.get(p.PERSONAL_REASON, "")),
            )


def coordinator_grid(grid: Grid) -> Grid:
    """Flower's grid, tuned for where the coordinator runs (see server/grid.py and
    pm_common/flower_patches.py for why each wait is shortened)."""
    if isinstance(grid, HttpGrid):  # deployed: collect replies without Flower's fixed 3 s waits
        return PollingGrid(grid)
    if isinstance(grid, InMemoryGrid):  # simulated: poll replies every 10 ms, not 100 ms
        flower_patches.set_simulation_pull_interval(grid, SIMULATION_PULL_INTERVAL)
    return grid


def serve(grid: Grid, context: Context, on_round: ProgressCallback | None = None) -> None:
    """Run the study the run config names (pm_common/study/run_settings.py) over `grid`.

    Args:
        grid: the coordinator's grid, tuned (`coordinator_grid`).
        context: the ServerApp's context; its run config carries the run's settings.
        on_round: simulation only: told after every round (the CLI's live display).
    """
    settings = RunSettings.of(context.run_config)
    study = load_study(settings.study_path())
    torch.manual_seed(study.seed)
    run_study(grid, study, settings, on_round)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point under `flwr run` and a deployed SuperLink.

    Args:
        grid: Flower's grid to the connected sites.
        context: the run's context; its run config names the study and run directory.
    """
    serve(coordinator_grid(grid), context)
