"""`flower-superlink` whose Control and Runtime APIs answer this host only; the Fleet API answers all.

Why: Flower 1.42 serves three APIs on one HTTPS port and has no setting to bind them apart; the
open-source SuperLink has no user authentication for its Control API (submit runs, register
SuperNode keys). `pmfl coordinator start` runs this launcher, which applies pmfl's SuperLink patches
(`pm_common.flower_patches`: the local-only middleware, and two changes to how Flower's SQL state
runs that set a round's pace) and then runs Flower's own `flower-superlink` unchanged.

Fails closed: if the local-only middleware cannot be attached to the app Flower builds, or does not
answer a Control API request from another host with 403, or Flower is another version than the
patches were written for, the SuperLink does not start: one line on stderr, exit status 1, no port
opened. The two performance patches refuse the same way unless switched off explicitly
(`PMFL_SUPERLINK_SERIAL_DB=0`, `PMFL_SUPERLINK_THROTTLE_CLEANUP=0`). `PMFL_TRACE_REQUESTS=FILE` logs
each request's timing.
"""

from __future__ import annotations

import os
import sys

from pm_common import flower_patches as patches

TRACE_ENV = "PMFL_TRACE_REQUESTS"  # a file: one JSON line per request (benchmarks/deploy_latency.py)
REFUSAL = "pmfl: the SuperLink refuses to start"


def apply_patches() -> None:
    """Every SuperLink patch this process is configured for; raises `PatchError` on the first that fails."""
    patches.protect_superlink(trace_path=os.environ.get(TRACE_ENV) or None)
    if patches.SUPERLINK_SERIAL_DB.enabled():
        patches.serialize_database_sessions()
    if patches.SUPERLINK_THROTTLE_CLEANUP.enabled():
        patches.throttle_token_cleanup()


def main() -> None:
    """Apply the SuperLink patches, then run Flower's own `flower-superlink` (see the module's docstring).

    Raises:
        SystemExit: With a one-line refusal (status 1) when a patch fails, otherwise with the
            SuperLink's exit code.
    """
    try:
        apply_patches()
        from flwr.superlink.cli.flower_superlink import flower_superlink

        code = flower_superlink()  # the patched factory and server guard raise PatchError too
    except patches.PatchError as exc:
        sys.exit(f"{REFUSAL}: {exc}")
    sys.exit(code)


if __name__ == "__main__":
    main()
