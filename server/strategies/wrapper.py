"""The base of pmfl's strategy wrappers: a Flower strategy that hands everything to the one it wraps.

Why wrappers: Flower composes behaviour around a strategy the way its DP wrappers do
(`DifferentialPrivacyServerSideFixedClipping(FedAvg(...))`): each wrapper changes what one concern
needs in `configure_*` and `aggregate_*` and passes the rest on. pmfl's coordinator is such a stack
(server/strategies/__init__.py); each wrapper subclasses this one and overrides only what it changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pm_common.wire import keys as p
from pm_common.wire.packing import model_content, split_metrics


class StrategyWrapper(Strategy):
    """Delegate every step to `inner`."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def innermost(self) -> Strategy:
        """The Flower strategy at the bottom of the stack (e.g. to read its state for a checkpoint)."""
        strategy: Strategy = self
        while isinstance(strategy, StrategyWrapper):
            strategy = strategy.inner
        return strategy


class PackingWrapper(StrategyWrapper):
    """A wrapper that sends models packed on the wire (pm_common/wire/packing.py): the base of the
    two wrappers that own the model's way to the sites, checked updates and secure aggregation."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return packed(self.inner.configure_evaluate(server_round, arrays, config, grid))


def packed(messages: Iterable[Message]) -> list[Message]:
    """A Flower strategy's messages ({ARRAYS, CONFIG}) with the model packed into one record
    (pm_common/wire/packing.py); one content object for all of them, as the strategy shares one
    among a round's messages (pushed once)."""
    messages, contents = list(messages), {}
    for msg in messages:
        key = id(msg.content)
        if key not in contents:
            arrays = {name: a.numpy() for name, a in msg.content[p.ARRAYS].items()}
            contents[key] = model_content(arrays, msg.content[p.CONFIG])
        msg.content = contents[key]
    return messages


def destination(sent: Iterable[Message], reply: Message) -> int:
    """The node a reply answers for: the SuperLink itself signs the errors it makes for a site that
    went offline, so the node is looked up from the message that was sent."""
    for message in sent:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def training_metrics(reply: Message) -> dict[str, float]:
    """A site's training metrics (its evaluation, in the same record, is the recorder's)."""
    metrics = reply.content.metric_records.get(p.TRAIN_METRICS)
    return split_metrics(metrics)[0] if metrics is not None else {}
