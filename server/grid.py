"""A Grid that collects replies sooner: Flower's HTTP grid waits 3 s between polls for replies.

Why: in deployment `send_and_receive` sleeps a fixed 3 s between pulls (superlink/grid/http_grid.py),
so every round (and the final evaluation) ends on average 1.5 s after the last reply arrived.
This wrapper runs the same push/pull cycle through the Grid's public API with a short interval;
everything else is delegated unchanged, so strategies see an ordinary Grid. A pull that brought
replies is followed by the next one at once: it spent its time downloading their contents (while
the sites uploaded them), and another site's reply listed meanwhile would otherwise wait another
interval (0.1-0.16 s at the end of a round, traced).

Polling sooner exposes a second fixed wait: the SuperLink lists a site's reply as soon as the site
has sent the message, before its contents are uploaded, and Flower's HttpGrid then retries the
contents after 1 s, 2 s, ... (`pull_objects`, PULL_INITIAL_BACKOFF). The `grid-content-retries` patch
(`pm_common.flower_patches`) makes that module retry from 0.05 s (this ServerApp process only); if it
cannot be applied the ServerApp stops with the reason (`PMFL_GRID_FAST_RETRIES=0` switches it off).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from pm_common import flower_patches

log = logging.getLogger("pmfl.server")
POLL_ENV = "PMFL_GRID_POLL_INTERVAL"
DEFAULT_POLL = 0.1  # seconds; a pull is one small HTTPS request to the SuperLink


class DelegatingGrid(Grid):
    """A Grid that hands every call to `inner`: the base of pmfl's grid wrappers, each of which
    changes one thing (how replies are awaited, which nodes a strategy sees) and nothing else."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PollingGrid(DelegatingGrid):
    """Delegate to `inner`, but wait for replies in steps of `poll_interval` seconds."""

    def __init__(self, inner: Grid, poll_interval: float | None = None) -> None:
        super().__init__(inner)
        flower_patches.fast_grid_content_retries()
        self.poll_interval = (
            float(os.environ.get(POLL_ENV, DEFAULT_POLL)) if poll_interval is None else poll_interval
        )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        started = time.monotonic()
        pending = {m for m in self.push_messages(messages) if m}
        sent = len(pending)
        deadline = None if timeout is None else started + timeout
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if not received:  # a pull that brought replies took a while (their contents): look again now
                time.sleep(self.poll_interval)
        if sent:
            log.info("%d of %d replies in %.2f s", len(replies), sent, time.monotonic() - started)
        return replies
