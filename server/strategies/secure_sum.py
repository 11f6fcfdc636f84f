"""Aggregate the sum of masked updates: the coordinator never sees one site's update.

With `[secure_aggregation]` on, sites send masked updates (client/secagg_masking.py). This wrapper
runs the key stages around each round's training messages (server/secagg_unmasking.py), checks
the shape of every masked reply (its values cannot be checked: each site bounds and checks its own
update before masking), removes the masks from their sum, and hands the wrapped Flower strategy one
stand-in reply: the weighted mean update applied to the global model. FedAvg returns it as is;
FedAvgM, FedAdam and kin use it as their pseudo-gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.recorder import RunRecorder
from server.secagg_unmasking import SecureAggregation
from server.strategies.wrapper import PackingWrapper, destination, packed, training_metrics
from server.update_checks import expected_layout, in_layout_dtypes, masked_layout, unpacked_update

log = logging.getLogger("pmfl.server")


class SecureSum(PackingWrapper):
    """Relay key shares, then aggregate only the unmasked sum of the sites' masked updates."""

    def __init__(
        self, inner: Strategy, recorder: RunRecorder, secure: SecureAggregation, min_sites: int = 1
    ) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self.secure = secure
        self.min_sites = min_sites
        self._layout: dict = {}
        self._sent_arrays: dict = {}
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._layout = expected_layout(arrays)
        self._sent_arrays = {k: a.numpy().astype("float64") for k, a in arrays.items()}
        messages = packed(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = self.secure.prepare(grid, server_round, messages)
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        masked = [msg for msg in replies if self._checked(server_round, msg)]
        if len(masked) >= self.min_sites:
            masked = self._unmasked_sum(masked)
        if len(masked) < self.min_sites:
            log.warning("round %d: %d usable masked updates, fewer than the %d required; global model kept",
                        server_round, len(masked), self.min_sites)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, masked)
        return (None if arrays is None else in_layout_dtypes(arrays, self._layout)), metrics

    def _checked(self, server_round: int, msg: Message) -> bool:
        site = str(msg.content[p.SITE][p.SITE_NAME])
        train = training_metrics(msg)
        arrays, problem = unpacked_update(
            msg.content.config_records.get(p.MASKED), masked_layout(self._layout), "masked update"
        )
        problem = problem or wire.metrics_problem(train)
        if problem:
            log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
            self.recorder.record_rejection(server_round, site, problem)
            return False
        content = RecordDict({
            p.MASKED: ArrayRecord({p.MASKED: Array(arrays[p.MASKED])}),
            p.TRAIN_METRICS: MetricRecord(train),
        })
        if p.SECAGG in msg.content.config_records:  # the site's keys for the next round
            content[p.SECAGG] = msg.content[p.SECAGG]
        msg.content = content
        return True

    def _unmasked_sum(self, replies: list[Message]) -> list[Message]:
        """One stand-in reply holding the weighted mean of the sites' updates applied to the global
        model (all the coordinator learns), or none if the masks cannot be removed."""
        masked = {destination(self._sent, m): m.content[p.MASKED][p.MASKED].numpy() for m in replies}
        next_keys = {  # the next round's keys, where the sites sent them with this round's reply
            destination(self._sent, m): m.content[p.SECAGG]
            for m in replies
            if p.SECAGG in m.content.config_records
        }
        recovered = self.secure.recover(masked, next_keys)
        if recovered is None:
            return []
        total, count = recovered
        if not total[-1] > 0:
            self.recorder.record_failure(self.secure.round_number, "secure aggregation: total weight 0")
            return []
        mean_delta = wire.unflatten(total[:-1] / total[-1], self._layout)  # the sites' flatten, inverted
        model = {
            k: Array((self._sent_arrays[k] + mean_delta[k]).astype(dtype))
            for k, (_, dtype) in self._layout.items()
        }
        metrics = [m.content[p.TRAIN_METRICS] for m in replies]
        examples = sum(float(m[p.NUM_EXAMPLES]) for m in metrics)
        merged = MetricRecord({
            p.NUM_EXAMPLES: examples,
            "train-loss": sum(float(m["train-loss"]) * float(m[p.NUM_EXAMPLES]) for m in metrics) / examples,
            "secagg-sites": count,
            "secagg-clipped": sum(int(m.get("secagg-clipped", 0)) for m in metrics),
        })
        stand_in = replies[0]
        stand_in.content = RecordDict({p.ARRAYS: ArrayRecord(model), p.TRAIN_METRICS: merged})
        return [stand_in]
