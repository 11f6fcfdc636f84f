"""The coordinator's strategy: the study's Flower strategy inside pmfl's wrappers, in Flower's style.

Outermost first:
- `ResumedRounds` (resumed.py): a resumed study's round numbers;
- `SiteReports` (reports.py): every site's report (ledger line, decline, evaluation) and every
  failure recorded; only trained replies go on;
- `CheckedUpdates` (checked_updates.py), or with secure aggregation `SecureSum` (secure_sum.py):
  models packed on the wire; each update checked, or the masked updates' sum unmasked;
- the Flower strategy the study names (choice.py), which aggregates.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from server.recorder import RunRecorder
from server.secagg_unmasking import SecureAggregation
from server.strategies.checked_updates import CheckedUpdates
from server.strategies.choice import build_strategy
from server.strategies.reports import SiteReports
from server.strategies.resumed import ResumedRounds
from server.strategies.secure_sum import SecureSum
from server.strategies.wrapper import StrategyWrapper

__all__ = ["ResumedRounds", "SiteReports", "StrategyWrapper", "build_strategy", "coordinator_strategy"]


def coordinator_strategy(
    inner: Strategy,
    recorder: RunRecorder,
    *,
    min_sites: int = 1,
    max_update_norm: float | None = None,
    round_offset: int = 0,
    secure: SecureAggregation | None = None,
) -> ResumedRounds:
    """`inner` wrapped in pmfl's stack (see the module docstring).

    Args:
        inner: the Flower strategy that aggregates.
        recorder: the run directory's recorder.
        min_sites: fewest usable updates a round needs to change the global model.
        max_update_norm: the study's bound on an update's L2 norm (plain updates only).
        round_offset: rounds a resumed study already used up.
        secure: run secure aggregation (the coordinator then sees only the sum of the updates).

    Returns:
        The strategy whose `start` runs the study.
    """
    aggregating: Strategy = (
        SecureSum(inner, recorder, secure, min_sites) if secure is not None
        else CheckedUpdates(inner, recorder, min_sites, max_update_norm)
    )
    return ResumedRounds(SiteReports(aggregating, recorder), round_offset)
