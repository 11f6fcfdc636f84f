"""Resume a study after the coordinator died: continue from its last checkpoint, never re-run a round.

Sites keep their own accountants (client/state.py), so a restarted coordinator neither loses nor
double-counts any spend as long as it keeps the ledgers it collected (append-only, never rewritten)
and never reuses a round number. If it died after recording a round's replies but before
checkpointing that round's aggregate, the round is lost (its updates are gone) but its spend is
real and already in the ledgers: the study goes on after it, so every site's rounds stay
consecutive and the number of rounds the sites planned their budgets for still holds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from torch import nn

from pm_common.records.ledger import ROUND_STATUSES, LedgerEntry, read_ledger
from server.recorder import RunRecorder, SiteRound

log = logging.getLogger("pmfl.server")
_CHECKPOINT = re.compile(r"round-(\d+)\.pt")
_MOMENTS = ("m_t", "v_t")  # FedAdam / FedYogi / FedAdagrad: {array name: ndarray}
_MOMENTUM = "momentum_vector"  # FedAvgM: [ndarray] in the ArrayRecord's order
_SITE_MEMORY = ("site_history", "site_suspicion")  # HistoryKrum: {site name: ndarray}


@dataclass(frozen=True)
class ResumePoint:
    """Where a restarted coordinator picks up."""

    checkpoint_round: int  # the global model after this round is the one to continue from (0: initial)
    state_dict: dict[str, torch.Tensor] | None  # None: no round was checkpointed; the initial model
    strategy_state: dict[str, Any] = field(default_factory=dict)
    lost: dict[int, list[LedgerEntry]] = field(default_factory=dict)  # recorded, never aggregated

    @property
    def round_offset(self) -> int:
        """Rounds already used up: the resumed study's first round is this plus one."""
        return max([self.checkpoint_round, *self.lost])


def lost_rounds(checkpoint_round: int, entries: list[LedgerEntry], run: str) -> dict[int, list[LedgerEntry]]:
    """Round lines of `run` after the checkpoint: spend that happened, in rounds that left no model.

    The ledgers were completed from the sites' own at enrolment, so a round the coordinator never
    recorded before it died is here too. Lines of other runs of the study (a site's ledger covers
    every run it took part in) are not this run's rounds.

    Args:
        checkpoint_round: The round of the last checkpoint.
        entries: The ledger entries collected from every site.
        run: The run's id.

    Returns:
        Each lost round mapped to its sites' lines, in round order.
    """
    lost: dict[int, list[LedgerEntry]] = {}
    for entry in entries:
        if entry.run == run and entry.status in ROUND_STATUSES and entry.round > checkpoint_round:
            lost.setdefault(entry.round, []).append(entry)
    return dict(sorted(lost.items()))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run (checkpoints/round-N.pt with the largest N).

    Chosen by the round in its name, not by file time, so copied or touched files cannot change it.

    Args:
        run_dir: The run directory.

    Returns:
        The checkpoint's path, or None when the run has none.
    """
    rounds = {
        int(m.group(1)): path
        for path in (Path(run_dir) / "checkpoints").glob("round-*.pt")
        if (m := _CHECKPOINT.fullmatch(path.name))
    }
    return rounds[max(rounds)] if rounds else None


def load_resume_point(run_dir: Path, run: str) -> ResumePoint:
    """The last checkpoint and the collected ledgers' rounds of `run` after it.

    Args:
        run_dir: The run directory.
        run: The run's id.

    Returns:
        Where to resume: the checkpoint's round (0 without one), its model and strategy state, and the
        lost rounds.
    """
    run_dir = Path(run_dir)
    path = last_checkpoint(run_dir)
    saved = torch.load(path, weights_only=True) if path else {"round": 0}
    ledgers = sorted((run_dir / "privacy").glob("ledger-*.jsonl"))
    entries = [entry for ledger in ledgers for entry in read_ledger(ledger)]
    return ResumePoint(
        checkpoint_round=int(saved["round"]),
        state_dict=saved.get("state_dict"),
        strategy_state=saved.get("strategy_state", {}),
        lost=lost_rounds(int(saved["round"]), entries, run),
    )


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a Flower strategy carries from round to round beyond the model.

    FedOpt's moments, FedAvgM's momentum, HistoryKrum's per-site memories. As tensors, so
    checkpoints load with `torch.load(weights_only=True)`.

    Args:
        strategy: The strategy.

    Returns:
        The state by attribute name; empty for a strategy that carries none.
    """
    state: dict[str, Any] = {}
    for name in (*_MOMENTS, *_SITE_MEMORY):
        moments = getattr(strategy, name, None)
        if moments:
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in moments.items()}
    momentum = getattr(strategy, _MOMENTUM, None)
    if momentum is not None:
        state[_MOMENTUM] = [torch.from_numpy(np.array(v)) for v in momentum]
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put the state `strategy_state` saved back onto the strategy, as NumPy arrays again.

    Args:
        strategy: The strategy, freshly built for the resumed run.
        state: The state from the checkpoint; attributes it lacks are left as they are.
    """
    for name in (*_MOMENTS, *_SITE_MEMORY):
        if name in state:
            setattr(strategy, name, {k: v.numpy() for k, v in state[name].items()})
    if _MOMENTUM in state:
        setattr(strategy, _MOMENTUM, [v.numpy() for v in state[_MOMENTUM]])


def resume_study(
    run_dir: Path, run: str, model: nn.Module, strategy: Strategy, recorder: RunRecorder
) -> int:
    """Load the run's last checkpoint into `model` and `strategy`, restore `recorder`'s record and note the
    lost rounds.

    Args:
        run_dir: The run directory.
        run: The run's id.
        model: The model to load the checkpoint's weights into.
        strategy: The strategy to restore.
        recorder: The run's recorder; the lost rounds' participation and failures are added to it.

    Returns:
        The round offset the wrapper strategy must apply (the rounds already used up).
    """
    point = load_resume_point(run_dir, run)
    if point.state_dict is not None:
        model.load_state_dict(point.state_dict)
    restore_strategy_state(strategy, point.strategy_state)
    recorder.restore(point.checkpoint_round)
    for server_round, entries in point.lost.items():
        recorder.participation[server_round] = [
            SiteRound(e.site, e.status, e.reason, e.epsilon) for e in entries
        ]
        recorder.record_failure(
            server_round,
            "the coordinator stopped before aggregating this round: its updates were lost; "
            "the sites' spend is in their ledgers",
        )
    log.info(
        "resuming %s from the model after round %d; %d lost round(s); next round %d",
        run_dir, point.checkpoint_round, len(point.lost), point.round_offset + 1,
    )
    return point.round_offset
