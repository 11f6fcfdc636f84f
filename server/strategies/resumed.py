"""Continue a study after a coordinator restart: Flower's `start` counts rounds from 1 again.

A resumed study's first round is the one after its last checkpoint and the rounds its sites spent
on while the coordinator was down (server/resume.py). This outermost wrapper runs only the rounds
left and numbers every step with the study's round numbers, so sites, ledgers, checkpoints and
metrics.json never see a round number twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from server.strategies.wrapper import StrategyWrapper


class ResumedRounds(StrategyWrapper):
    """Shift every round of the wrapped stack by `offset`, the rounds the study already used up."""

    def __init__(self, inner: Strategy, offset: int = 0) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

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
        """Run the study's rounds after `offset`: `num_rounds` is the study's total, and
        `evaluate_fn` sees the study's round numbers (a resumed study's round 1 is offset + 1)."""
        offset = self.offset

        def shifted(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and offset:
                return None  # the resumed model is the last checkpoint: already saved
            return evaluate_fn(flower_round + offset, arrays) if evaluate_fn else None

        return super().start(grid, initial_arrays, max(0, num_rounds - offset), timeout, train_config,
                             evaluate_config, shifted if evaluate_fn else None)
