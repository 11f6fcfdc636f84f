"""Keep what every site reports each round, whatever becomes of its update.

Every reply carries the site's report: its signed ledger line, whether it trained or declined and
why, its evaluation of the model it received, warnings. This wrapper records all of it in the run
directory (server/recorder.py), records the failures of sites that did not answer, and passes on
only the replies of sites that trained: the wrappers below decide what becomes of their updates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pm_common.records.ledger import DECLINED, TRAINED
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.recorder import RunRecorder, SiteRound
from server.strategies.wrapper import StrategyWrapper, destination

log = logging.getLogger("pmfl.server")


class SiteReports(StrategyWrapper):
    """Record every site's report and every failure; aggregate only the trained replies."""

    def __init__(self, inner: Strategy, recorder: RunRecorder) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.record_sent(server_round, arrays)  # kept only for an empirical audit
        self._sent = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained = []
        for msg in replies:
            if msg.has_error():
                reason = f"node {destination(self._sent, msg)}: {msg.error.reason}"
                log.warning("round %d: no reply from %s", server_round, reason)
                self.recorder.record_failure(server_round, reason)
            elif self._record(server_round, msg):
                trained.append(msg)
        try:
            return self.inner.aggregate_train(server_round, trained)
        finally:
            self.recorder.round_finished(server_round)

    def _record(self, server_round: int, msg: Message) -> bool:
        """Store the site's report; whether it trained (its reply then goes on to aggregation)."""
        site_record = msg.content.config_records.get(p.SITE)
        if site_record is None:
            self.recorder.record_failure(server_round, "reply without a site record (not a pmfl site?)")
            return False
        site = str(site_record[p.SITE_NAME])
        ledger_line = str(site_record.get(p.LEDGER_LINE, ""))
        report = SiteRound(
            site,
            str(site_record[p.STATUS]),
            str(site_record.get(p.REASON, "")),
            json.loads(ledger_line).get("epsilon") if ledger_line else None,
            files_skipped=int(site_record.get(p.FILES_SKIPPED, 0)),
            warning=str(site_record.get(p.WARNING, "")),
        )
        if site_record.get(p.NOISE_SEEDED):
            self.recorder.noise_seeded = True
        metrics = msg.content.metric_records.get(p.TRAIN_METRICS)
        evaluation = wire.split_metrics(metrics)[1] if metrics is not None else None
        if evaluation is not None:
            self.recorder.record_evaluation(server_round - 1, site, evaluation)
        if report.status == DECLINED:
            log.info("round %d: %s declined: %s", server_round, site, report.reason)
        self.recorder.record_site_round(server_round, report, ledger_line)
        return report.status == TRAINED

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None  # evaluations arrive with the training replies and go to the recorder
