"""Flower strategies for a pmfl study, wrapped so sites can decline and every report is kept.

`SiteReportingStrategy` wraps any `flwr.serverapp.strategy` strategy (like Flower's own DP
wrappers do): it stores each site's ledger line and evaluation, drops declined or invalid
replies, and hands only genuine updates to the wrapped strategy's aggregation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from pm_common import protocol as p
from pm_common.config import StrategyConfig
from pm_common.ledger import DECLINED, TRAINED
from server.recorder import RunRecorder, SiteRound
from server.validation import expected_layout, update_problem

log = logging.getLogger("pmfl.server")


def build_strategy(config: StrategyConfig, num_sites: int) -> FedAvg:
    """The named Flower strategy, sampling every site each round.

    Per-round evaluation messages are off: sites evaluate the model they receive at the start of
    each training round and send it with their reply, which halves the round trips per round.
    """
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": 0,
        "min_available_nodes": num_sites,
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # silence "federated evaluation will be skipped": it is not
    try:
        return _construct(config, common)
    finally:
        flwr_logger.setLevel(level)


def _construct(config: StrategyConfig, common: dict) -> FedAvg:
    if config.name == "fedavg":
        return FedAvg(**common)
    if config.name == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=1.0, server_momentum=config.server_momentum)
    opt = {"eta": config.server_learning_rate, "tau": config.tau}
    if config.name == "fedadam":
        return FedAdam(**common, **opt)
    if config.name == "fedyogi":
        return FedYogi(**common, **opt)
    if config.name == "fedadagrad":
        return FedAdagrad(**common, **opt)
    raise ValueError(f"unknown strategy {config.name!r}")


class SiteReportingStrategy(Strategy):
    """Keep what every site reports; aggregate only the updates that are real and well-formed."""

    def __init__(self, inner: FedAvg, recorder: RunRecorder, min_sites: int = 1) -> None:
        self.inner = inner
        self.recorder = recorder
        self.min_sites = min_sites
        self._layout: dict = {}

    def summary(self) -> None:
        log.info(
            "SiteReportingStrategy(min_sites=%d) around %s",
            self.min_sites,
            type(self.inner).__name__,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._layout = expected_layout(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contributions = []
        for msg in replies:
            if msg.has_error():
                reason = f"node {msg.metadata.src_node_id}: {msg.error.reason}"
                log.warning("round %d: no reply from %s", server_round, reason)
                self.recorder.record_failure(server_round, reason)
                continue
            update = self._record(server_round, msg.content)
            if update is not None:
                msg.content = update
                contributions.append(msg)
        self.recorder.round_finished(server_round)
        if len(contributions) < self.min_sites:
            log.warning(
                "round %d: %d usable updates, fewer than the %d required; global model kept",
                server_round,
                len(contributions),
                self.min_sites,
            )
            return None, None
        return self.inner.aggregate_train(server_round, contributions)

    def _record(self, server_round: int, content: RecordDict) -> RecordDict | None:
        """Store the site's report; return the aggregatable part of its reply, if any."""
        site_record = content.config_records.get(p.SITE)
        if site_record is None:
            self.recorder.record_failure(
                server_round, "reply without a site record (not a pmfl site?)"
            )
            return None
        site = str(site_record[p.SITE_NAME])
        ledger_line = str(site_record.get(p.LEDGER_LINE, ""))
        epsilon = json.loads(ledger_line).get("epsilon") if ledger_line else None
        report = SiteRound(
            site, str(site_record[p.STATUS]), str(site_record.get(p.REASON, "")), epsilon
        )
        evaluation = content.metric_records.get(p.EVAL_METRICS)
        if evaluation is not None:
            self.recorder.record_evaluation(server_round - 1, site, dict(evaluation))
        update = None
        if report.status == TRAINED:
            arrays = content.array_records.get(p.ARRAYS)
            problem = (
                "no model update in a 'trained' reply"
                if arrays is None
                else update_problem(arrays, self._layout)
            )
            if problem:
                report.rejected = problem
                log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
            else:
                update = RecordDict({p.ARRAYS: arrays, p.TRAIN_METRICS: content[p.TRAIN_METRICS]})
        elif report.status == DECLINED:
            log.info("round %d: %s declined: %s", server_round, site, report.reason)
        public_key = site_record.get(p.LEDGER_PUBLIC_KEY)
        if public_key:
            self.recorder.record_site_key(server_round, site, str(public_key))
        fits = site_record.get(p.NEXT_ROUND_FITS)
        self.recorder.record_site_round(
            server_round, report, ledger_line, None if fits is None else bool(fits)
        )
        return update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None  # evaluations arrive with the training replies and go to the recorder
