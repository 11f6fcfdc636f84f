"""Hospital-level DP (DP-FedAvg): protect a whole hospital's data in the aggregate.

Each site clips its model update to `clip_norm` and adds its share of Gaussian noise, so that the
sum over the n planned sites carries noise of std `noise_multiplier * clip_norm`: the aggregate is
then a Gaussian mechanism with respect to any one hospital (sensitivity `clip_norm`). The unit is a
hospital, not a patient; this guarantee is accounted and reported apart from the per-patient
ledger, and the two are never added.

Against the coordinator the guarantee holds for the aggregate only when it cannot see individual
updates (secure aggregation); a single site's update carries 1/sqrt(n) of the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import dp_accounting
import torch

from pm_common.study.config import HospitalDPConfig


def clip_and_noise(
    update: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Scale `update` (a model delta) to L2 norm at most `clip_norm`, then add N(0, noise_std^2)."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {
        name: t * scale + torch.randn(t.shape, generator=generator, dtype=t.dtype) * noise_std
        for name, t in update.items()
    }


def site_noise_std(config: HospitalDPConfig, planned_sites: int) -> float:
    """One site's share: n independent shares of variance (z C)^2 / n sum to the aggregate's noise."""
    return config.noise_multiplier * config.clip_norm / math.sqrt(planned_sites)


def effective_noise_multiplier(config: HospitalDPConfig, contributing: int, planned_sites: int) -> float:
    """When only k of n sites contribute, the sum holds k shares: multiplier z * sqrt(k / n)."""
    return config.noise_multiplier * math.sqrt(contributing / planned_sites)


def hospital_epsilon(
    contributions: Sequence[int], planned_sites: int, config: HospitalDPConfig
) -> float:
    """Cumulative epsilon (RDP, dp-accounting) of the aggregate over all rounds so far.

    Every site takes part in every round (no sampling amplification), so each round is a plain
    Gaussian mechanism with the noise its contributing sites actually added.
    """
    accountant = dp_accounting.rdp.RdpAccountant()
    for k in contributions:
        if k > 0:
            z = effective_noise_multiplier(config, k, planned_sites)
            accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(config.delta)) if any(contributions) else 0.0
