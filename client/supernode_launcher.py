"""`flower-supernode` with a shorter idle poll: Flower's SuperNode sleeps a fixed 3 s between pulls.

Why: `flwr.supernode.start_client_internal` waits `time.sleep(3)` whenever a pull finds no message
(and 0.5 s between checks for a reply); Flower has no flag or variable for either. A message that
arrives during that sleep waits for it, on average 1.5 s per round and site. This launcher caps
those sleeps at `PMFL_SUPERNODE_POLL_INTERVAL` seconds inside that one module, then runs Flower's
own `flower-supernode` unchanged. It is opt-in (`[connection] poll_interval` in site.toml): each
pull is one small HTTPS request, so a shorter interval means more requests to the coordinator.
"""

from __future__ import annotations

import os
import time
import types
from typing import Any

POLL_ENV = "PMFL_SUPERNODE_POLL_INTERVAL"


class _CappedTime(types.ModuleType):
    """The `time` module as seen by the SuperNode's main loop, with its sleeps capped."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self._cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))


def patch_poll_interval(cap: float) -> bool:
    """Cap the SuperNode loop's sleeps at `cap` seconds; False if this Flower has no such loop."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        return False
    loop.time = _CappedTime(cap)  # type: ignore[attr-defined]
    return True


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = float(os.environ.get(POLL_ENV, "0") or 0)
    if cap > 0 and not patch_poll_interval(cap):
        print(f"warning: {POLL_ENV} ignored: this Flower version's SuperNode loop is not the expected one")
    flower_supernode()


if __name__ == "__main__":
    main()
