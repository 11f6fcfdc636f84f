"""Tests only: replayable DP noise for simulated sites, so a test that checks a threshold can replay.

Why: Poisson sampling and the Gaussian noise of DP-SGD draw from OS entropy, as they must (a seed
anyone could know makes the noise predictable and voids the guarantee). A test that asserts, say,
that the federation's accuracy stays above a threshold then fails now and then with no way to
replay the failing draw. With `PMFL_REPLAY_SEED=N` in its environment, a *simulated* site (one
Flower's Simulation Engine runs, without a site directory of its own) seeds each round's noise from
N, its name, the round and the attempt; a deployed site ignores it. A run with seeded noise says so
in its metrics.json (`noise_seeded_for_replay`): it carries no privacy guarantee against anyone who
knows N.
"""

from __future__ import annotations

import hashlib
import os

from flwr.app import Context

REPLAY_SEED_ENV = "PMFL_REPLAY_SEED"


def replay_seed(context: Context, site: str, server_round: int, attempt: int, purpose: str) -> int | None:
    """The seed of one round's noise at a simulated site, or None (OS entropy) unless replay is asked.

    Args:
        context: the node's Flower context (a deployed site has `site-dir` in its node config).
        site: the site's name.
        server_round: the round.
        attempt: the coordinator's attempt at the run.
        purpose: which noise (e.g. "dp-sgd", "hospital-dp"): each gets its own stream.

    Returns:
        A 63-bit seed, or None.
    """
    base = os.environ.get(REPLAY_SEED_ENV, "")
    if not base or context.node_config.get("site-dir"):
        return None
    digest = hashlib.sha256(f"{base}:{site}:{server_round}:{attempt}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
