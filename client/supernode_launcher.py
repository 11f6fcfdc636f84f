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
LOCAL_WAIT = 0.05  # seconds between looks at the SuperNode's local store (Flower: 0.5)
RETRY_START, RETRY_CAP = 0.05, 1.0  # seconds, retries of unavailable contents (Flower: 1 and 10)
_NETWORK_SLEEP = 1.0  # Flower's loop sleeps 3 s before its next pull, 0.5 s on local waits


class _CappedTime(types.ModuleType):
    """The `time` module as seen by the SuperNode's main loop, with its sleeps capped."""

    def __init__(self, poll: float, local: float) -> None:
        super().__init__("time")
        self._poll = poll
        self._local = local

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._poll if seconds >= _NETWORK_SLEEP else self._local))


def patch_supernode_loop(poll: float, local: float = LOCAL_WAIT) -> bool:
    """Cap the SuperNode loop's idle poll at `poll` and its local waits at `local` seconds, and retry
    unavailable contents sooner; False (nothing changed) if this Flower has no such loop."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time or not callable(getattr(loop, "pull_objects", None)):
        return False
    loop.time = _CappedTime(poll, local)  # type: ignore[attr-defined]
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
