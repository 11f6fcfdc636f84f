"""The one-run audit statistics (Steinke, Nasr, Jagielski 2023) behave as the paper says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from pm_common.audit.one_run import (
    audit_from_scores,
    best_audit_from_scores,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)


def test_reference_point_1000_canaries_100_correct_guesses() -> None:
    """Our notes: 1000 canaries, 100 guesses all correct, 95% -> about 3.5 (delta ~1e-5)."""
    bound = epsilon_lower_bound(1000, 100, 100, delta=1e-5, confidence=0.95)
    assert 3.3 < bound < 3.6
    # pure DP (delta = 0): p^100 = 0.05 exactly at the bound, a closed form
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(math.log(p / (1 - p)), 1e-5)
    # delta can only weaken the evidence
    assert bound < epsilon_lower_bound(1000, 100, 100, 0.0)


def test_p_value_matches_its_definition() -> None:
    m, r, v, eps, delta = 500, 60, 50, 1.0, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = binom.sf(v - 1, r, q)
    alpha = max((binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - i, r, q)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(beta + 2 * m * delta * alpha, rel=1e-9)
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(beta, rel=1e-12)
    # larger epsilon claims are harder to reject
    assert p_value(m, r, v, 0.5, delta) < p_value(m, r, v, 1.0, delta) < p_value(m, r, v, 2, delta)


def test_bound_is_where_the_p_value_crosses_the_significance() -> None:
    m, r, v, delta = 1000, 300, 250, 1e-5
    bound = epsilon_lower_bound(m, r, v, delta, 0.95)
    assert p_value(m, r, v, bound - 1e-3, delta) < 0.05 < p_value(m, r, v, bound + 1e-3, delta)
    assert epsilon_lower_bound(m, r, v, delta, 0.99) < bound  # more confidence, weaker claim


def test_half_right_proves_nothing() -> None:
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0


def test_guesses_from_scores_top_and_bottom() -> None:
    scores = [0.9, 0.1, 0.8, 0.2, 0.5, 0.7]
    included = [True, False, False, False, True, True]
    # top-2 = idx 0 (in, right), 2 (out, wrong); bottom-2 = idx 1, 3 (both out, right)
    assert guesses_from_scores(scores, included, 2, 2) == (4, 3)
    assert guesses_from_scores(scores, included, 0, 0) == (0, 0)
    with pytest.raises(ValueError):
        guesses_from_scores(scores, included, 4, 3)


def _canaries(rng: np.random.Generator, m: int) -> np.ndarray:
    return rng.random(m) < 0.5  # each canary in with probability 1/2, as the theorem requires


def test_positive_control_without_noise_gives_a_clearly_positive_bound() -> None:
    rng = np.random.default_rng(0)
    included = _canaries(rng, 1000)
    scores = included + 0.01 * rng.standard_normal(1000)  # memorised: scores reveal membership
    result = audit_from_scores(scores, included, k_pos=100, k_neg=100, delta=1e-5)
    assert (result.guesses, result.correct) == (200, 200)
    assert result.epsilon_lower_bound > 3.5


def test_random_guessing_gives_about_zero() -> None:
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(20):
        included = _canaries(rng, 1000)
        result = audit_from_scores(rng.standard_normal(1000), included, 100, 100, delta=1e-5)
        bounds.append(result.epsilon_lower_bound)
    assert np.median(bounds) == 0.0 and max(bounds) < 0.5


def test_bound_is_valid_against_a_known_epsilon_mechanism() -> None:
    """eps-DP randomized response per canary: the 95% bound may exceed eps in <= ~5% of runs."""
    rng = np.random.default_rng(2)
    eps, m, trials = 2.0, 1000, 100
    keep = math.exp(eps) / (1 + math.exp(eps))
    above, bounds = 0, []
    for _ in range(trials):
        included = _canaries(rng, m)
        answer = np.where(rng.random(m) < keep, included, ~included)
        bound = audit_from_scores(answer.astype(float), included, m // 2, m // 2, 1e-5)
        bounds.append(bound.epsilon_lower_bound)
        above += bound.epsilon_lower_bound > eps
    assert above <= 0.05 * trials + 3  # 95% confidence, with binomial slack
    assert np.median(bounds) > 1.0  # and it is not vacuous: most of eps = 2 is found


def test_best_over_k_is_bonferroni_corrected() -> None:
    rng = np.random.default_rng(3)
    included = _canaries(rng, 1000)
    scores = included + 0.6 * rng.standard_normal(1000)
    ks = [(25, 25), (50, 50), (100, 100), (200, 200)]
    best = best_audit_from_scores(scores, included, ks, delta=1e-5)
    singles = [audit_from_scores(scores, included, a, b, 1e-5) for a, b in ks]
    assert best.epsilon_lower_bound <= max(s.epsilon_lower_bound for s in singles)
    assert best.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(1000, best.guesses, best.correct, 1e-5, 1 - 0.05 / len(ks)))
    assert best.to_dict()["confidence"] == 0.95
