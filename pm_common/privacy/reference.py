"""The reference accounting: cumulative epsilon by Google's dp-accounting, a second implementation.

Why a second implementation: the auditor recomputes every epsilon a site reports without trusting
the code (Opacus) that produced it. Sites use the same figure as a floor: a site reports, and plans
against, the larger of Opacus' RDP and this one, so an auditor never sees an honest site over its
budget because two implementations round differently (pm_common/privacy/accountant.py).

Pure functions over a mechanism history: (noise_multiplier, sample_rate, steps) entries, each one
run of Poisson-sampled Gaussian DP-SGD, composed in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

PLD_DISCRETIZATION = 1e-3
"""PLD value discretization. dp_accounting's PLD is pessimistic, so a coarser grid still gives an
upper bound; 1e-3 is ~10x faster than the default 1e-4 and changes epsilon by ~1e-4 relative."""

RDP_ORDERS: tuple[float, ...] = tuple(sorted(
    {1 + x / 10.0 for x in range(1, 100)} | set(range(12, 64)) | set(rdp_lib.DEFAULT_RDP_ORDERS)
))
"""Opacus' order grid plus dp_accounting's: minimising over a superset of Opacus' orders means an
honest Opacus figure is never flagged because of the grid."""


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting logs one warning per RDP order it drops; we record the fact instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=256)
def _one_step_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step of the Poisson-subsampled Gaussian at every order in RDP_ORDERS."""
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    with _quiet_absl():
        acc.compose(event, 1)
    return tuple(float(x) for x in acc.rdp)


def _mechanism(history: Sequence[Sequence[float]]) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in history]


def rdp_epsilons(history: Sequence[Sequence[float]], delta: float) -> tuple[list[float], bool]:
    """Cumulative RDP epsilon after each (noise_multiplier, sample_rate, steps) entry.

    RDP composes additively, so one step is computed once per mechanism and scaled by its steps.
    Also returns whether the figure is limited by the order grid: dp_accounting gives up on some
    small fractional orders (Opacus evaluates them), and when the optimum lands on the smallest
    order it could evaluate, the dropped ones might have given a lower epsilon.
    """
    total = np.zeros(len(RDP_ORDERS))
    out: list[float] = []
    limited = False
    for sigma, q, steps in _mechanism(history):
        if steps > 0:
            total = total + (np.inf if sigma <= 0 else steps * np.asarray(_one_step_rdp(q, sigma)))
        finite = np.isfinite(total)
        if not total.any():
            out.append(0.0)
        elif not finite.any():
            out.append(math.inf)
        else:
            eps, order = rdp_lib.compute_epsilon(RDP_ORDERS, total.tolist(), delta)
            first = RDP_ORDERS[int(np.argmax(finite))]
            limited = limited or (not finite[0] and order == first)
            out.append(float(eps))
    return out, limited


PLD_MIN_SIGMA = 0.3


def pld_epsilons(
    history: Sequence[Sequence[float]], delta: float, discretization: float = PLD_DISCRETIZATION
) -> list[float]:
    """Cumulative epsilon after each entry by privacy loss distributions (tight, dp_accounting).

    Below PLD_MIN_SIGMA the discretised distribution grows past any memory (epsilon is huge
    anyway): from such an entry on the tight figure is not computed (NaN) and RDP stands alone.
    """
    acc = PLDAccountant(value_discretization_interval=discretization)
    out: list[float] = []
    composed = False
    for sigma, q, steps in _mechanism(history):
        if 0 < sigma < PLD_MIN_SIGMA or (out and math.isnan(out[-1])):
            out.append(float("nan"))
            continue
        if steps > 0:
            if sigma <= 0:
                acc.compose(dp_event.NonPrivateDpEvent())
            else:
                acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
            composed = True
        out.append(float(acc.get_epsilon(delta)) if composed else 0.0)
    return out


def rdp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative RDP epsilon of a whole history (the independent twin of Opacus' figure)."""
    values, _ = rdp_epsilons(history, delta)
    return values[-1] if values else 0.0


