"""`flower-supernode` with shorter waits: Flower's SuperNode loop waits in fixed steps of 3, 0.5 and 1 s.

Why: `flwr.supernode.start_client_internal` has no flag or variable for any of these waits:
- `time.sleep(3)` whenever a pull from the SuperLink finds no message: a message that arrives
  during it waits, on average 1.5 s per round and site;
- `time.sleep(0.5)` between looks at its own in-process store for the ClientApp's reply (and that
  reply's contents): a ready reply waits up to 0.5 s more before it is sent;
- `pull_objects` retries a message's contents after 1 s, then 2 s, ... when they are not on the
  SuperLink yet, which is common: the ServerApp uploads them just after the message itself, so a
  SuperNode that pulls at the wrong moment loses a second.
This launcher replaces the `time` module and `pull_objects` of that one module, then runs Flower's
own `flower-supernode` unchanged:
- the idle poll (sleeps of 1 s or more: a network request each) is capped at
  `PMFL_SUPERNODE_POLL_INTERVAL` seconds, opt-in (`[connection] poll_interval` in site.toml): a
  shorter interval means more small HTTPS requests from an idle site to the coordinator;
- for `ACTIVE_WINDOW` seconds after the site sent a reply, it polls every `ACTIVE_POLL` seconds:
  the next round's message comes a fraction of a second after the last site's reply, and with
  the idle interval each site picked it up up to a whole interval late (a round waits for its last
  site: with three sites and 0.5 s, 0.375 s on average). That costs a few more requests per
  round while a study runs, none while the site is idle;
- the local waits (shorter sleeps: no network) are capped at `LOCAL_WAIT` seconds;
- content retries start at `RETRY_START` seconds and double up to `RETRY_CAP` (a few more small
  requests, only while a message's contents are in flight).
"""

from __future__ import annotations

import functools
import os
import time
import types
from typing import Any

POLL_ENV = "PMFL_SUPERNODE_POLL_INTERVAL"
LOCAL_WAIT = 0.02  # seconds between looks at the SuperNode's local store (Flower: 0.5)
ACTIVE_POLL, ACTIVE_WINDOW = 0.1, 5.0  # seconds: the poll interval for a while after each reply
RETRY_START, RETRY_CAP = 0.05, 1.0  # seconds, retries of unavailable contents (Flower: 1 and 10)
_NETWORK_SLEEP = 1.0  # Flower's loop sleeps 3 s before its next pull, 0.5 s on local waits


class _CappedTime(types.ModuleType):
    """The `time` module as seen by the SuperNode's main loop, with its sleeps capped."""

    def __init__(self, poll: float, local: float) -> None:
        super().__init__("time")
        self._poll = poll
        self._local = local
        self.replied_at = -float("inf")  # time.monotonic() when the site last sent a reply

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < _NETWORK_SLEEP:
            cap = self._local
        elif time.monotonic() - self.replied_at < ACTIVE_WINDOW:
            cap = min(self._poll, ACTIVE_POLL)
        else:
            cap = self._poll
        time.sleep(min(seconds, cap))


def patch_supernode_loop(poll: float, local: float = LOCAL_WAIT) -> bool:
    """Cap the SuperNode loop's idle poll at `poll` and its local waits at `local` seconds, and retry
    unavailable contents sooner; False (nothing changed) if this Flower has no such loop."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time or not all(
        callable(getattr(loop, name, None)) for name in ("pull_objects", "_push_messages")
    ):
        return False
    capped = _CappedTime(poll, local)
    push_messages = loop._push_messages

    def push_and_note(*args: Any, **kwargs: Any) -> None:
        try:
            push_messages(*args, **kwargs)
        finally:
            capped.replied_at = time.monotonic()

    loop.time = capped  # type: ignore[attr-defined]
    loop._push_messages = push_and_note  # type: ignore[attr-defined]
    loop.pull_objects = functools.partial(  # type: ignore[attr-defined]
        loop.pull_objects, initial_backoff=RETRY_START, backoff_cap=RETRY_CAP
    )
    return True


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll = float(os.environ.get(POLL_ENV, "0") or 0)
    if not patch_supernode_loop(poll if poll > 0 else 3.0):
        print(f"warning: {POLL_ENV} ignored: this Flower version's SuperNode loop is not the expected one")
    flower_supernode()


if __name__ == "__main__":
    main()
