"""Flower strategies for a pmfl study, wrapped so sites can decline and every report is kept.

`SiteReportingStrategy` wraps any `flwr.serverapp.strategy` strategy (like Flower's own DP
wrappers do): it stores each site's ledger line and evaluation, drops declined or invalid
replies, and hands only genuine updates to the wrapped strategy's aggregation. On the wire a
model travels packed into one record (pm_common/wire/packing.py); the wrapped strategy sees ArrayRecords.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
    Result,
    Strategy,
)

from pm_common.records.ledger import DECLINED, TRAINED
from pm_common.study.config import StrategyConfig, server_learning_rate
from pm_common.wire import keys as p
from pm_common.wire import packing as wire
from server.history_krum import HistoryKrum
from server.recorder import RunRecorder, SiteRound
from server.secagg_unmasking import SecureAggregation
from server.update_checks import (
    expected_layout,
    in_layout_dtypes,
    masked_layout,
    norm_problem,
    unpacked_update,
)

log = logging.getLogger("pmfl.server")


def model_content(arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
    """What the sites receive: the config and the model packed into one record (pm_common/wire/packing.py)."""
    return RecordDict({
        p.CONFIG: config,
        p.MODEL: wire.packed_record({name: a.numpy() for name, a in arrays.items()}),
    })


def _packed(messages: Iterable[Message]) -> list[Message]:
    """A Flower strategy's messages ({ARRAYS, CONFIG}) with the model packed; one content object
    for all of them, as the strategy shares one among a round's messages."""
    messages, packed = list(messages), {}
    for msg in messages:
        key = id(msg.content)
        if key not in packed:
            packed[key] = model_content(msg.content[p.ARRAYS], msg.content[p.CONFIG])
        msg.content = packed[key]
    return messages


def _metrics_problem(train: dict[str, float]) -> str:
    """Why a trained reply's metrics cannot be aggregated ('' if they can)."""
    return "" if p.NUM_EXAMPLES in train else f"no {p.NUM_EXAMPLES} in a 'trained' reply's metrics"


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
        return FedAvgM(
            **common,
            server_learning_rate=server_learning_rate(config),
            server_momentum=config.server_momentum,
        )
    opt = {"eta": server_learning_rate(config), "tau": config.tau}
    if config.name == "fedadam":
        return FedAdam(**common, **opt)
    if config.name == "fedyogi":
        return FedYogi(**common, **opt)
    if config.name == "fedadagrad":
        return FedAdagrad(**common, **opt)
    return _robust(config, common)


def _robust(config: StrategyConfig, common: dict) -> FedAvg:
    """Flower's Byzantine-robust aggregators (coordinate-wise trimmed mean and median, Krum)."""
    if config.name == "trimmed-mean":
        if int(config.trim_fraction * common["min_train_nodes"]) == 0:
            log.warning(
                "trim_fraction %g trims no update with %d sites; use at least 1/%d",
                config.trim_fraction,
                common["min_train_nodes"],
                common["min_train_nodes"],
            )
        return FedTrimmedAvg(**common, beta=config.trim_fraction)
    if config.name == "median":
        return FedMedian(**common)
    if config.name == "krum":  # Flower's Krum is MultiKrum selecting one update
        if config.krum_history > 0:
            return HistoryKrum(**common, history=config.krum_history,
                               outlier_ratio=config.krum_outlier_ratio,
                               num_malicious_nodes=config.krum_malicious,
                               aggregate=config.krum_aggregate, score=config.krum_score)
        return MultiKrum(**common, num_malicious_nodes=config.krum_malicious,
                         num_nodes_to_select=config.krum_select)
    raise ValueError(f"unknown strategy {config.name!r}")


class SiteReportingStrategy(Strategy):
    """Keep what every site reports; aggregate only the updates that are real and well-formed."""

    def __init__(
        self,
        inner: FedAvg,
        recorder: RunRecorder,
        min_sites: int = 1,
        max_update_norm: float | None = None,
        round_offset: int = 0,
        secure: SecureAggregation | None = None,
    ) -> None:
        """`round_offset`: rounds a resumed study already ran; Flower's `start` counts from 1 again.
        `secure`: aggregate masked updates (the coordinator then sees only their sum)."""
        self.inner = inner
        self.recorder = recorder
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.round_offset = round_offset
        self.secure = secure
        self._layout: dict = {}
        self._sent_arrays: dict = {}
        self._sent: list[Message] = []

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
        server_round += self.round_offset
        self._layout = expected_layout(arrays)
        if self.max_update_norm is not None or self.secure is not None:
            self._sent_arrays = {k: a.numpy().astype("float64") for k, a in arrays.items()}
        self.recorder.record_sent(server_round, arrays)  # kept only for an empirical audit
        self._sent = _packed(self.inner.configure_train(server_round, arrays, config, grid))
        if self.secure is not None:
            self._sent = self.secure.prepare(grid, server_round, self._sent)
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        contributions = []
        for msg in replies:
            if msg.has_error():
                reason = f"node {self._destination(msg)}: {msg.error.reason}"
                log.warning("round %d: no reply from %s", server_round, reason)
                self.recorder.record_failure(server_round, reason)
                continue
            update = self._record(server_round, msg.content)
            if update is not None:
                msg.content = update
                contributions.append(msg)
        if self.secure is not None and len(contributions) >= self.min_sites:
            contributions = self._unmasked_sum(contributions)
        self.recorder.round_finished(server_round)
        if len(contributions) < self.min_sites:
            log.warning(
                "round %d: %d usable updates, fewer than the %d required; global model kept",
                server_round,
                len(contributions),
                self.min_sites,
            )
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, contributions)
        if isinstance(self.inner, HistoryKrum) and server_round in self.inner.excluded:
            self.recorder.record_left_out(server_round, self.inner.excluded.pop(server_round))
        return (None if arrays is None else in_layout_dtypes(arrays, self._layout)), metrics

    def _unmasked_sum(self, replies: list[Message]) -> list[Message]:
        """Secure aggregation: one stand-in reply holding the weighted mean of the sites' updates
        applied to the global model (all the coordinator learns), for the wrapped strategy to use
        like any site's reply: FedAvg returns it as is, FedAdam and kin take it as the mean."""
        assert self.secure is not None
        masked = {self._destination(m): m.content[p.MASKED][p.MASKED].numpy() for m in replies}
        next_keys = {
            self._destination(m): m.content[p.SECAGG] for m in replies if p.SECAGG in m.content.config_records
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
        merged = MetricRecord(
            {
                p.NUM_EXAMPLES: examples,
                "train-loss": sum(float(m["train-loss"]) * float(m[p.NUM_EXAMPLES]) for m in metrics)
                / examples,
                "secagg-sites": count,
                "secagg-clipped": sum(int(m.get("secagg-clipped", 0)) for m in metrics),
            }
        )
        stand_in = replies[0]
        stand_in.content = RecordDict({p.ARRAYS: ArrayRecord(model), p.TRAIN_METRICS: merged})
        return [stand_in]

    def _destination(self, reply: Message) -> int:
        """The site a reply answers for: the SuperLink itself signs the errors it makes for a
        site that went offline, so the node is looked up from the message that was sent."""
        for sent in self._sent:
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _record(self, server_round: int, content: RecordDict) -> RecordDict | None:
        """Store the site's report; return the aggregatable part of its reply, if any."""
        site_record = content.config_records.get(p.SITE)
        if site_record is None:
            self.recorder.record_failure(server_round, "reply without a site record (not a pmfl site?)")
            return None
        site = str(site_record[p.SITE_NAME])
        ledger_line = str(site_record.get(p.LEDGER_LINE, ""))
        epsilon = json.loads(ledger_line).get("epsilon") if ledger_line else None
        report = SiteRound(
            site,
            str(site_record[p.STATUS]),
            str(site_record.get(p.REASON, "")),
            epsilon,
            files_skipped=int(site_record.get(p.FILES_SKIPPED, 0)),
            warning=str(site_record.get(p.WARNING, "")),
        )
        if site_record.get(p.NOISE_SEEDED):
            self.recorder.noise_seeded = True
        metrics = content.metric_records.get(p.TRAIN_METRICS)
        train, evaluation = wire.split_metrics(metrics) if metrics is not None else ({}, None)
        if evaluation is not None:
            self.recorder.record_evaluation(server_round - 1, site, evaluation)
        update = None
        if report.status == TRAINED and self.secure is not None:
            masked, problem = unpacked_update(
                content.config_records.get(p.MASKED), masked_layout(self._layout), "masked update"
            )
            problem = problem or _metrics_problem(train)
            if problem:
                report.rejected = problem
                log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
            else:
                update = RecordDict({
                    p.MASKED: ArrayRecord({p.MASKED: Array(masked[p.MASKED])}),
                    p.TRAIN_METRICS: MetricRecord(train),
                })
                if p.SECAGG in content.config_records:  # the site's keys for the next round
                    update[p.SECAGG] = content[p.SECAGG]
        elif report.status == TRAINED:
            arrays, problem = unpacked_update(content.config_records.get(p.MODEL), self._layout)
            problem = (
                problem
                or _metrics_problem(train)
                or norm_problem(arrays, self._sent_arrays, self.max_update_norm)
            )
            if problem:
                report.rejected = problem
                log.warning("round %d: update from %s rejected: %s", server_round, site, problem)
            else:
                record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
                update = RecordDict(
                    {
                        p.ARRAYS: record,
                        p.TRAIN_METRICS: MetricRecord(train),
                        p.SITE: site_record,  # who sent it: robust strategies keep per-site state
                    }
                )
                self.recorder.record_update(server_round, site, record)  # likewise
        elif report.status == DECLINED:
            log.info("round %d: %s declined: %s", server_round, site, report.reason)
        self.recorder.record_site_round(server_round, report, ledger_line)
        return update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return _packed(self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None  # evaluations arrive with the training replies and go to the recorder

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the study's rounds after `round_offset`: `num_rounds` is the study's total, and
        `evaluate_fn` sees the study's round numbers (a resumed study's round 1 is offset + 1)."""
        offset = self.round_offset
        if self.secure is not None:
            self.secure.timeout, self.secure.last_round = timeout, num_rounds

        def shifted(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and offset:
                return None  # the resumed model is the last checkpoint: already saved
            return evaluate_fn(flower_round + offset, arrays) if evaluate_fn else None

        return super().start(
            grid,
            initial_arrays,
            max(0, num_rounds - offset),
            timeout,
            train_config,
            evaluate_config,
            shifted if evaluate_fn else None,
        )
