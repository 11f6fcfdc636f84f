"""Aggregate only updates that are well-formed and within the study's bound.

A site's model travels packed into one record (pm_common/wire/packing.py). This wrapper packs the
models it sends, and unpacks and checks every trained reply before the wrapped Flower strategy sees
it as an ArrayRecord: the names, shapes and dtypes of the global model, finite values, the
training metrics FedAvg weighs by, and the study's `max_update_norm`. A reply that fails is
recorded as rejected, with the reason; a round with fewer usable updates than `min_sites` keeps the
global model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.history_krum import HistoryKrum
from server.recorder import RunRecorder
from server.strategies.wrapper import PackingWrapper, packed, training_metrics
from server.update_checks import expected_layout, in_layout_dtypes, norm_problem, unpacked_update

log = logging.getLogger("pmfl.server")


class CheckedUpdates(PackingWrapper):
    """Unpack and check each site's update; hand the wrapped strategy only those that pass."""

    def __init__(
        self, inner: Strategy, recorder: RunRecorder, min_sites: int = 1, max_update_norm: float | None = None
    ) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self._layout: dict = {}
        self._sent_arrays: dict = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._layout = expected_layout(arrays)
        if self.max_update_norm is not None:
            self._sent_arrays = {k: a.numpy().astype("float64") for k, a in arrays.items()}
        return packed(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = [msg for msg in replies if self._checked(server_round, msg)]
        if len(usable) < self.min_sites:
            log.warning("round %d: %d usable updates, fewer than the %d required; global model kept",
                        server_round, len(usable), self.min_sites)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        if isinstance(self.inner, HistoryKrum) and server_round in self.inner.excluded:
            self.recorder.record_left_out(server_round, self.inner.excluded.pop(server_round))
        return (None if arrays is None else in_layout_dtypes(arrays, self._layout)), metrics

    def _checked(self, server_round: int, msg: Message) -> bool:
        """Replace the reply's packed model by its arrays if it passes; record why if it does not."""
        site_record = msg.content[p.SITE]
        site = str(site_record[p.SITE_NAME])
        train = training_metrics(msg)
        arrays, problem = unpacked_update(msg.content.config_records.get(p.MODEL), self._layout)
        problem = (problem or wire.metrics_problem(train)
                   or norm_problem(arrays, self._sent_arrays, self.max_update_norm))
        if problem:
            log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
            self.recorder.record_rejection(server_round, site, problem)
            return False
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        msg.content = RecordDict({
            p.ARRAYS: record,
            p.TRAIN_METRICS: MetricRecord(train),
            p.SITE: site_record,  # who sent it: robust strategies keep per-site state
        })
        self.recorder.record_update(server_round, site, record)  # kept only for an empirical audit
        return True
