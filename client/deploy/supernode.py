"""`flower-supernode` with shorter waits: Flower's SuperNode loop waits in fixed steps of 3, 0.5 and 1 s.

Why: `flwr.supernode.start_client_internal` has no flag or variable for its waits (a 3 s sleep after
every empty pull, 0.5 s steps while the ClientApp works, content retries after 1 s, 2 s, ...). This
launcher applies pmfl's `supernode-loop` patch (`pm_common.flower_patches`, which says what changes
and why) and then runs Flower's own `flower-supernode` unchanged. `pmfl site start` uses it when
site.toml's `[connection] poll_interval` is under 3 s; otherwise Flower's own `flower-supernode` runs.

Fails closed: if the patch cannot be applied or verified (another Flower version, a loop that no
longer waits this way), the SuperNode does not start: one line on stderr naming the setting that
runs Flower's own loop instead, exit status 1.
"""

from __future__ import annotations

import os
import sys

from pm_common import flower_patches as patches

POLL_ENV = "PMFL_SUPERNODE_POLL_INTERVAL"  # seconds, the idle poll (site.toml's poll_interval)
REFUSAL = "pmfl: the SuperNode refuses to start"


def main() -> None:
    """Patch the SuperNode's waits to the site's poll interval, then run Flower's `flower-supernode`.

    Raises:
        SystemExit: With a one-line refusal when the patch cannot be applied or verified.
    """
    poll = float(os.environ.get(POLL_ENV, "0") or 0)
    try:
        patches.patch_supernode_loop(poll if poll > 0 else 3.0)
    except patches.PatchError as exc:
        sys.exit(f"{REFUSAL}: {exc}")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
