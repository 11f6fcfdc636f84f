"""Privacy accounting: the maths behind a site's cumulative (epsilon, delta) guarantee.

Pure functions over a mechanism history: a list of (noise_multiplier, sample_rate, steps) entries,
the same triples Opacus' accountants keep. Composing the whole history at once is what makes the
reported epsilon cumulative: nothing here ever accounts a round on its own.

Under-promise: with the RDP accountant a site's epsilon is the larger of Opacus' figure and the
reference figure an auditor recomputes with Google's dp-accounting (pm_common/privacy/reference.py).
The two agree to about 1e-4 relative, but not always in the same direction: a site that planned and
reported by Opacus alone could land at 7.9988 by its own count and 8.0001 by the auditor's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from pm_common.privacy.reference import rdp_epsilon as reference_rdp_epsilon

DEFAULT_ACCOUNTANT = "rdp"
"""RDP is the conservative choice (it over-states epsilon slightly against PRV/PLD): under-promise."""

MechanismStep = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps) of one run of Poisson-sampled Gaussian DP-SGD."""


def cumulative_epsilon(
    history: Sequence[Sequence[float]], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon of everything in `history`, composed, at `delta`: what a site reports and plans by.

    With RDP, the larger of Opacus' figure and the reference figure (see the module docstring).
    """
    steps = _mechanisms(history)
    if not steps:
        return 0.0
    if accountant == "rdp":
        return max(_opacus_epsilon(steps, float(delta), accountant), _reference_epsilon(steps, float(delta)))
    return _opacus_epsilon(steps, float(delta), accountant)


def opacus_epsilon(
    history: Sequence[Sequence[float]], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Opacus' own figure for `history` (the site reports `cumulative_epsilon`, never less)."""
    steps = _mechanisms(history)
    return _opacus_epsilon(steps, float(delta), accountant) if steps else 0.0


def _mechanisms(history: Sequence[Sequence[float]]) -> tuple[MechanismStep, ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)


@functools.lru_cache(maxsize=256)
def _reference_epsilon(history: tuple[MechanismStep, ...], delta: float) -> float:
    return reference_rdp_epsilon(history, delta)


@functools.lru_cache(maxsize=256)
def _opacus_epsilon(history: tuple[MechanismStep, ...], delta: float, accountant: str) -> float:
    """Cached: a site asks for the same history's epsilon when it checks and when it reports."""
    if accountant == "rdp":
        # Opacus' RDPAccountant.get_privacy_spent, with each mechanism's one-step RDP computed once
        # (it recomputes it for every entry and every query: ~0.3 s of CPU each, several per round).
        # RDP composes additively, so the sum below is bit for bit the one Opacus forms.
        rdp = sum([np.asarray(_rdp_one_step(q, sigma)) * steps for sigma, q, steps in history])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step of the sampled Gaussian mechanism at Opacus' default orders."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(r) for r in rdp)


class BudgetTooLow(ValueError):
    """No noise multiplier keeps the planned training within the budget: the site cannot take part.

    Its message names the budget and the plan, never the site's data: it is the reason a site
    records in its ledger when it declines.
    """


CALIBRATION_STEP = 1.001
"""Relative step by which sigma grows until the conservative figure fits the budget."""

MAX_NOISE_MULTIPLIER = 1e6  # Opacus' own ceiling: a budget that needs more is too low to plan
EPSILON_TOLERANCE = 0.01  # Opacus' default: the plan spends between budget - 0.01 and the budget
MAX_PRV_STEPS = 5_000
"""The most DP-SGD steps a site may plan with the PRV accountant. PRV's numerical composition grows
with the steps: measured here, 2 600 steps took 1.5 s and 0.4 GB to calibrate, 26 000 steps 4.6 s
and 0.8 GB, 200 000 steps 31 s and 2.2 GB, and 2 * 10^8 steps ran out of memory. Each round's budget
check composes the history again, so the bound keeps PRV studies short; RDP has no such limit."""


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Smallest noise multiplier (to Opacus' search tolerance) whose `steps` steps at
    `sample_rate` stay within (epsilon, delta) by `cumulative_epsilon`, the figure the site
    reports: Opacus' search first (`search_noise_multiplier`), then sigma raised in 0.1 % steps
    while the conservative figure is still over the budget.

    Raises:
        BudgetTooLow: no noise multiplier up to MAX_NOISE_MULTIPLIER fits the budget.
        ValueError: the arguments are out of range, or a PRV plan is longer than MAX_PRV_STEPS.
    """
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(
            f"privacy budget must have epsilon > 0 and 0 < delta < 1, got ({epsilon}, {delta})"
        )
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got ({sample_rate}, {steps})")
    if accountant == "prv" and steps > MAX_PRV_STEPS:
        raise ValueError(
            f"the prv accountant is limited to {MAX_PRV_STEPS} planned DP-SGD steps (this plan has "
            f"{steps}); use accountant = \"rdp\", or fewer rounds, local epochs or larger batches"
        )
    try:
        sigma = search_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as exc:  # no sigma up to MAX_NOISE_MULTIPLIER meets the budget
        raise BudgetTooLow(f"privacy budget too low: {exc}") from None
    while cumulative_epsilon([(sigma, sample_rate, steps)], delta, accountant) > epsilon:
        sigma *= CALIBRATION_STEP
    return sigma


def search_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus' `get_noise_multiplier` search, made to terminate: same arguments, same result.

    Opacus doubles sigma until the budget holds, then bisects until epsilon is within 0.01 of the
    budget. That bisection never ends when epsilon jumps by more than 0.01 between two neighbouring
    floats, which a large epsilon over billions of steps does (epsilon 100, delta 0.1, q = 1e-7,
    10^13 steps looped for ever here); this one also stops once sigma's interval cannot shrink, and
    wherever Opacus terminates it returns exactly Opacus' sigma (checked on a grid of budgets, rates
    and steps). The sigma returned always keeps the composed epsilon within the budget. The caller
    refuses PRV plans above MAX_PRV_STEPS, where PRV would exhaust the memory.

    Args:
        target_epsilon: the budget's epsilon.
        target_delta: the budget's delta.
        sample_rate: Poisson sampling rate q.
        steps: DP-SGD steps planned in all.
        accountant: Opacus accountant name ("rdp", "prv").

    Returns:
        The noise multiplier.

    Raises:
        ValueError: no sigma up to MAX_NOISE_MULTIPLIER meets the budget (Opacus: "The privacy budget
            is too low.").
    """
    account = create_accountant(mechanism=accountant)

    def spent(sigma: float) -> float:
        account.history = [(sigma, sample_rate, int(steps))]
        return float(account.get_epsilon(delta=target_delta))

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = spent(sigma_high)
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"the privacy budget is too low: no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps "
                f"epsilon within {target_epsilon:g} at delta {target_delta:g} over {steps} steps at "
                f"sampling rate {sample_rate:.3g}; raise epsilon, or plan fewer rounds or local epochs"
            )
    while target_epsilon - eps_high > EPSILON_TOLERANCE and sigma_high - sigma_low > 1e-12 * sigma_high:
        sigma = (sigma_low + sigma_high) / 2
        eps = spent(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)


@dataclass(frozen=True)
class PrivacyPlan:
    """A site's DP-SGD settings for a whole study, fixed once before its first round."""

    epsilon_budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    max_grad_norm: float
    accountant: str = DEFAULT_ACCOUNTANT
    personal_steps: int = 0  # personalisation's DP-SGD steps after the federation, reserved up front
    batch_size: int = 0  # the expected batch the site chose ([training] plan = "auto"); 0: the study's

    @property
    def planned_steps(self) -> int:
        """Every DP-SGD step the plan pays for: the federation's rounds and the personal steps."""
        return self.steps_per_round * self.planned_rounds + self.personal_steps

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyPlan:
        """A saved plan (plans saved before personalisation existed have no personal steps)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def plan_study(
    *,
    epsilon_budget: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    planned_rounds: int,
    max_grad_norm: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    personal_epochs: int = 0,
) -> PrivacyPlan:
    """Fix sigma so that `planned_rounds` rounds of local DP-SGD, and then `personal_epochs` epochs
    of personalisation, spend at most the budget together.

    One local epoch is k = ceil(n / batch_size) Poisson-sampled steps at q = 1/k: the rate Opacus'
    DPDataLoader uses for a loader of k batches, so the planned q is exactly the q that runs. The
    personal epochs run at the same q and sigma, so the whole plan is one mechanism composed over
    `planned_steps` steps: reserving them here is what keeps the site within its budget.
    """
    if num_examples < 1 or batch_size < 1 or local_epochs < 1 or personal_epochs < 0:
        raise ValueError(
            "need at least one training example, batch_size >= 1, local_epochs >= 1 and "
            "personal_epochs >= 0"
        )
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps_per_round = local_epochs * batches
    personal_steps = personal_epochs * batches
    sigma = calibrate_noise_multiplier(
        epsilon_budget, delta, sample_rate, steps_per_round * planned_rounds + personal_steps, accountant
    )
    return PrivacyPlan(
        epsilon_budget=epsilon_budget,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=planned_rounds,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        personal_steps=personal_steps,
    )


@dataclass(frozen=True)
class BudgetDecision:
    """Whether one more round fits a site's budget, and the epsilon it would reach."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str = ""


def check_next_round(
    plan: PrivacyPlan, history: Sequence[Sequence[float]], reserved_steps: int = 0, steps: int | None = None
) -> BudgetDecision:
    """Decide before training whether `steps` more steps at `plan` (default: a full round) keep the
    site within its budget, with `reserved_steps` still owed to later work.

    Args:
        plan: the site's plan (its sigma, q, budget and accountant).
        history: every mechanism the site ran for the study.
        reserved_steps: steps at the plan's mechanism promised to later work (personalisation's, while
            the federation runs): a coordinator asking for more rounds than planned may not eat them.
        steps: the steps asked now (None: one federated round, `plan.steps_per_round`).

    Returns:
        The decision, with epsilon now and after the steps (the reserve not included).
    """
    what = "this round" if steps is None else f"{steps} more steps"
    steps = plan.steps_per_round if steps is None else steps
    mechanism = (plan.noise_multiplier, plan.sample_rate)
    now = cumulative_epsilon(history, plan.delta, plan.accountant)
    after = cumulative_epsilon([*history, (*mechanism, steps)], plan.delta, plan.accountant)
    with_reserve = after
    if reserved_steps:
        with_reserve = cumulative_epsilon(
            [*history, (*mechanism, steps), (*mechanism, reserved_steps)], plan.delta, plan.accountant
        )
    if with_reserve > plan.epsilon_budget:
        reserve = f" and then {with_reserve:.3f} after the {reserved_steps} personal steps it reserved" \
            if reserved_steps else ""
        return BudgetDecision(
            False,
            now,
            after,
            f"privacy budget: {what} would raise epsilon from {now:.3f} to {after:.3f}"
            f"{reserve}, over the site's budget of {plan.epsilon_budget:g} (delta={plan.delta:g})",
        )
    return BudgetDecision(True, now, after)
