"""Empirical privacy lower bound from one training run (Steinke, Nasr and Jagielski, 2023).

Reference: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846. Setting: m canaries, each included in the training data
independently with probability 1/2 (the secret bits S). After training, an attacker that sees only
the model makes r guesses T_i in {-1, +1} (abstaining on the other m - r canaries); v of them are
right. Their main theorem: if training is (epsilon, delta)-DP, then for every v

    P[V >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, p) >= v],            p = e^epsilon / (1 + e^epsilon),
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, p) < v] / i.

So the right-hand side is a p-value for the claim "training is (epsilon, delta)-DP". The lower bound
at confidence c is the largest epsilon whose p-value is still below 1 - c (the p-value grows with
epsilon): with probability at least c, the true epsilon is at least that large.

Why this matters here: the bound is a test of the *implementation*, not of the accounting. An
accounted epsilon below the empirical lower bound proves a bug (noise missing, wrong sample rate).
The converse does not hold: a lower bound far below the accounted epsilon is normal, because a
one-run audit with a black-box attacker is loose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

REFERENCE = (
    "Steinke, Nasr, Jagielski (2023), Privacy Auditing with One (1) Training Run, "
    "NeurIPS 2023, arXiv:2305.08846"
)


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of seeing >= v correct out of r guesses if training were (epsilon, delta)-DP."""
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got ({epsilon}, {delta})")
    p = float(expit(epsilon))  # e^eps / (1 + e^eps): accuracy of eps-DP randomized response
    beta = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= W < v] = P[W >= v - i] - P[W >= v]
    window = binom.sf(v - i - 1, r, p) - beta
    alpha = float(np.max(window / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95
) -> float:
    """Largest epsilon that `v` correct out of `r` guesses on `m` canaries rule out at `confidence`.

    Returns 0.0 when not even epsilon = 0 can be rejected (e.g. guessing at random).
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1.0 - confidence

    def objective(eps: float) -> float:  # > 0 while (eps, delta)-DP is still rejected
        return significance - p_value(m, r, v, eps, delta)

    if r == 0 or objective(0.0) <= 0:
        return 0.0
    hi = 1.0
    while objective(hi) > 0:
        hi *= 2.0
        if hi > 1e4:  # v == r with a huge r: any finite epsilon is rejected
            return math.inf
    return float(brentq(objective, hi / 2.0 if hi > 1.0 else 0.0, hi, xtol=1e-6))


def guesses_from_scores(
    scores: Sequence[float], included: Sequence[bool], k_pos: int, k_neg: int
) -> tuple[int, int]:
    """Guess "in" for the k_pos highest scores and "out" for the k_neg lowest: (r, v).

    Higher score must mean "more likely trained on" (e.g. minus the canary's loss). The guesses
    depend on the scores alone; the secret bits are used only to count the correct ones.
    """
    s = np.asarray(scores, dtype=float)
    bits = np.asarray(included, dtype=bool)
    if s.shape != bits.shape or s.ndim != 1:
        raise ValueError("scores and included must be 1-D and of the same length")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"need 0 <= k_pos, k_neg and k_pos + k_neg <= {s.size}")
    order = np.argsort(s, kind="stable")  # ascending
    negatives = order[:k_neg]
    positives = order[s.size - k_pos:] if k_pos else order[:0]
    correct = int(bits[positives].sum()) + int((~bits[negatives]).sum())
    return k_pos + k_neg, correct


@dataclass(frozen=True)
class EmpiricalAuditResult:
    """One audit's counts and bound, as written to privacy/empirical_audit.json."""

    canaries: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    k_pos: int | None = None
    k_neg: int | None = None
    reference: str = REFERENCE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if math.isinf(self.epsilon_lower_bound):
            data["epsilon_lower_bound"] = None
            data["unbounded"] = True
        return data


def audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float = 0.95,
) -> EmpiricalAuditResult:
    """The one-run audit for fixed k_pos / k_neg (fix them before looking at the results)."""
    r, v = guesses_from_scores(scores, included, k_pos, k_neg)
    m = len(scores)
    return EmpiricalAuditResult(
        canaries=m,
        guesses=r,
        correct=v,
        delta=delta,
        confidence=confidence,
        epsilon_lower_bound=epsilon_lower_bound(m, r, v, delta, confidence),
        k_pos=k_pos,
        k_neg=k_neg,
    )


def best_audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    ks: Sequence[tuple[int, int]],
    delta: float,
    confidence: float = 0.95,
) -> EmpiricalAuditResult:
    """Best bound over several (k_pos, k_neg) choices, Bonferroni-corrected.

    Picking the best k after seeing the outcome is a multiple test: each candidate is run at
    significance (1 - confidence) / len(ks), so the reported bound keeps its stated confidence.
    """
    if not ks:
        raise ValueError("need at least one (k_pos, k_neg) choice")
    per_test = 1.0 - (1.0 - confidence) / len(ks)
    best = max(
        (audit_from_scores(scores, included, kp, kn, delta, per_test) for kp, kn in ks),
        key=lambda a: a.epsilon_lower_bound,
    )
    return EmpiricalAuditResult(
        canaries=best.canaries,
        guesses=best.guesses,
        correct=best.correct,
        delta=delta,
        confidence=confidence,
        epsilon_lower_bound=best.epsilon_lower_bound,
        k_pos=best.k_pos,
        k_neg=best.k_neg,
    )
