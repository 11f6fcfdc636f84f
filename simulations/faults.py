"""Faults a researcher rehearses in a simulation before any hospital is involved: simulation only.

A study names them in its simulation-only table (never sent to sites):

    [simulation]
    crash_coordinator_after = 3   # the coordinator is killed (SIGKILL) once round 3's replies are in

The coordinator dies the hardest way there is: after the sites trained, spent their budget and
replied, before it recorded a single reply or checkpointed the round, with no clean-up at all
(`kill -9` of the whole process group: the coordinator and the simulated sites with it). Then
`pmfl simulate ... --resume` shows what a hospital would see: the round that was lost is in every
site's ledger, the run's record is completed from the sites, and the audit passes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from pm_common.study.config import StudyConfig, StudyConfigError
from pm_common.wire import keys as p
from server.grid import DelegatingGrid

CRASH_KEY = "crash_coordinator_after"


def crash_round(study: StudyConfig) -> int | None:
    """The round after whose replies the simulated coordinator is killed, if the study asks for it.

    Raises:
        StudyConfigError: the setting is not a round of the study.
    """
    table = study.raw.get("simulation", {})
    value = table.get(CRASH_KEY) if isinstance(table, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= study.rounds:
        raise StudyConfigError(
            f"[simulation].{CRASH_KEY}: must be a round of the study, 1 to {study.rounds}; got {value!r}"
        )
    return value


class CrashingGrid(DelegatingGrid):
    """The simulated coordinator's grid, which kills the whole process group (SIGKILL) as soon as
    the training replies of round `after` have arrived, before anything records them."""

    def __init__(self, inner: Grid, after: int) -> None:
        super().__init__(inner)
        self.after = after

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if any(
            m.metadata.message_type == MessageType.TRAIN
            and int(m.content[p.CONFIG].get(p.SERVER_ROUND, 0)) == self.after
            for m in messages
        ):
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return replies
