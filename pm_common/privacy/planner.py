"""A site's DP-SGD plan for a study, and what it means for learning: one helper for every caller.

`site_plan` is the plan a site's ClientApp fixes before its first round (client/app.py), the plan a
simulation's preflight shows (simulations/preflight.py) and the plan `pmfl plan` explains: one
function, so the three can never disagree. `utility` turns a plan into the figures that predict
whether DP-SGD can learn at all, and `advise` names the change that helps most.

Noise-to-signal. DP-SGD clips each example's gradient to norm C, sums a Poisson batch of expected
size B = q * n, adds Gaussian noise of std sigma * C per coordinate and divides by B. The averaged
clipped gradient has norm at most C; the noise on it has std sigma * C / B in every coordinate. So
sigma / B is the noise, per coordinate, relative to the largest signal a step can carry
(Ponomareva et al. 2023, "How to DP-fy ML", JAIR, section 5; De et al. 2022, "Unlocking
high-accuracy differentially private image classification through scale", who make B large for
exactly this reason). At fixed epsilon, a larger B raises sigma far less than it raises B, and
fewer steps need less sigma: both lower the ratio.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

from pm_common.privacy.accountant import BudgetTooLow, PrivacyPlan, plan_study
from pm_common.study.config import PrivacySettings, SiteSpec, StudyConfig, TrainingConfig

DROWNING_RATIO = 1.0
"""Flag a plan whose noise, as a whole vector, is at least as large as the largest signal a step can
carry: sigma * sqrt(d) / B >= 1 for a model of d parameters, i.e. noise-to-signal sigma / B at or above
1 / sqrt(d). The averaged clipped gradient has norm at most C (less whenever the batch's examples
disagree); the noise on it has norm about sigma * C * sqrt(d) / B. Past the threshold even a batch whose
examples all agree moves the model less than the noise does; below it a step's signal can show through,
and averaging over steps does the rest."""


def drowning_threshold(parameters: int) -> float:
    """The noise-to-signal sigma / B at which a model of `parameters` parameters is flagged."""
    return DROWNING_RATIO / math.sqrt(max(parameters, 1))


def planned_rounds(study: StudyConfig, privacy: PrivacySettings, rounds: int | None = None) -> int:
    """The federated rounds a site plans for: the study's (or the coordinator's `rounds`), capped by
    the site's own round limit."""
    asked = study.rounds if rounds is None else rounds
    return asked if privacy.max_rounds is None else min(asked, privacy.max_rounds)


def site_plan(
    study: StudyConfig, site: SiteSpec, train_rows: int, rounds: int | None = None
) -> tuple[int, PrivacyPlan | None]:
    """The rounds a site plans for and its DP-SGD plan, exactly as its ClientApp fixes them.

    Personalisation's steps are part of the plan (`personal_steps`: finetune's epochs after the
    federation, or Ditto's personal epochs of every round), so the sigma fixed here pays for every
    step the site will take.

    Args:
        study: the study the coordinator sends.
        site: the site, with its own privacy settings.
        train_rows: the site's training rows after its split.
        rounds: the rounds the coordinator asks for (None: the study's).

    Returns:
        (planned rounds, plan), the plan None when the site trains without DP.

    Raises:
        BudgetTooLow: no noise multiplier meets the site's budget (the site will decline).
        ValueError: a PRV plan is too long, or no training rows.
    """
    privacy = site.privacy
    planned = planned_rounds(study, privacy, rounds)
    if not privacy.dp:
        return planned, None
    if study.training.plan == "auto":
        return planned, _auto_plan(study, privacy, planned, train_rows)
    return planned, _plan_at(study, privacy, planned, train_rows, study.training.batch_size)


def _plan_at(study: StudyConfig, privacy: PrivacySettings, planned: int, train_rows: int, batch: int
             ) -> PrivacyPlan:
    """The site's plan at expected batch `batch` (recorded in the plan only when the site chose it)."""
    personal = study.personalization
    personal_epochs = {"finetune": personal.epochs, "ditto": planned * study.training.local_epochs}
    with warnings.catch_warnings():  # Opacus: "optimal order is the largest alpha", a looser bound only
        warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
        plan = plan_study(
            epsilon_budget=privacy.epsilon,
            delta=privacy.delta,
            num_examples=train_rows,
            batch_size=batch,
            local_epochs=study.training.local_epochs,
            planned_rounds=planned,
            max_grad_norm=study.training.max_grad_norm,
            accountant=privacy.accountant,
            personal_epochs=personal_epochs.get(personal.method, 0),
        )
    return replace(plan, batch_size=batch) if study.training.plan == "auto" else plan


AUTO_MARGIN = 0.5
"""`plan = "auto"` aims at half the drowning threshold: a step's signal then clearly shows through."""


def batch_candidates(start: int, train_rows: int) -> list[int]:
    """Expected batches `plan = "auto"` tries: the study's, doubled until the site's rows (included)."""
    candidates, batch = [], max(1, start)
    while batch < train_rows:
        candidates.append(batch)
        batch *= 2
    return [*candidates, train_rows]


def _auto_plan(study: StudyConfig, privacy: PrivacySettings, planned: int, train_rows: int) -> PrivacyPlan:
    """`[training] plan = "auto"`: the smallest expected batch, from the study's doubled up to the site's
    rows, whose noise-to-signal is at most AUTO_MARGIN x the drowning threshold; else the one with the
    least. Larger expected batches and so fewer steps at the same epsilon lower sigma / B (De et al.
    2022; Ponomareva et al. 2023, section 5.3); the smallest batch that is clear of the noise keeps as
    many optimisation steps as that allows. Local epochs stay the study's, so steps per round follow.

    Raises:
        BudgetTooLow: no candidate batch fits the budget.
    """
    target = AUTO_MARGIN * drowning_threshold(model_parameters(study))
    best: tuple[float, PrivacyPlan] | None = None
    refusal: BudgetTooLow | None = None
    for batch in batch_candidates(study.training.batch_size, train_rows):
        try:
            plan = _plan_at(study, privacy, planned, train_rows, batch)
        except BudgetTooLow as exc:
            refusal = exc
            continue
        ratio = utility(plan, train_rows, 1).noise_to_signal
        if ratio <= target:
            return plan
        if best is None or ratio < best[0]:
            best = (ratio, plan)
    if best is None:
        assert refusal is not None
        raise refusal
    return best[1]


@dataclass(frozen=True)
class Utility:
    """What a plan means for learning at one site."""

    train_rows: int
    noise_multiplier: float
    sample_rate: float
    expected_batch: float  # q * n
    steps: int  # every step planned, personal ones included
    noise_to_signal: float  # sigma / expected batch, per step
    threshold: float  # drowning_threshold of the study's model

    @property
    def drowned(self) -> bool:
        return self.noise_to_signal >= self.threshold


def model_parameters(study: StudyConfig) -> int:
    """Trainable parameters of the study's model: the dimension the noise is spread over."""
    from pm_common.tasks import task_of  # the model's shape needs the task's contract

    return sum(p.numel() for p in task_of(study).build_model(study).parameters() if p.requires_grad)


def utility(plan: PrivacyPlan, train_rows: int, parameters: int) -> Utility:
    """The learning-relevant figures of `plan` for a site with `train_rows` training rows, training
    a model of `parameters` parameters."""
    batch = plan.sample_rate * train_rows
    return Utility(train_rows, plan.noise_multiplier, plan.sample_rate, batch, plan.planned_steps,
                   plan.noise_multiplier / batch, drowning_threshold(parameters))


@dataclass(frozen=True)
class Advice:
    """One change to the study or the site's budget, and the noise-to-signal it would give."""

    change: str
    noise_to_signal: float | None  # None: no DP plan fits even after the change


def _with(study: StudyConfig, **training: Any) -> StudyConfig:
    return replace(study, training=replace(study.training, **training))


def alternatives(study: StudyConfig, site: SiteSpec, train_rows: int, parameters: int) -> list[Advice]:
    """The changes that lower noise-to-signal, each re-planned by `site_plan`, best first.

    Tried: a 4x larger expected batch (capped at the site's rows), half the rounds, one local epoch
    (when more), twice the budget. Personalisation does not lower the noise; `advise` adds it as
    a separate suggestion.

    Args:
        study: the study as it stands.
        site: the site, with its budget.
        train_rows: its training rows.
        parameters: the model's parameters.

    Returns:
        The changes that apply, sorted by the noise-to-signal they give (lowest first).
    """
    training: TrainingConfig = study.training
    candidates: list[tuple[str, StudyConfig, SiteSpec]] = []
    bigger = min(train_rows, training.batch_size * 4)
    if bigger > training.batch_size:
        factor = bigger / training.batch_size
        candidates.append((f"[training].batch_size = {bigger} (expected batch x{factor:.3g})",
                           _with(study, batch_size=bigger), site))
    if study.rounds > 1:
        half = max(1, study.rounds // 2)
        candidates.append((f"[study].rounds = {half}", replace(study, rounds=half), site))
    if training.local_epochs > 1:
        candidates.append(("[training].local_epochs = 1", _with(study, local_epochs=1), site))
    if site.privacy.dp:
        more = min(site.privacy.epsilon * 2, 100.0)
        candidates.append((f"the site's epsilon = {more:g} (a larger budget: the site's decision)", study,
                           replace(site, privacy=replace(site.privacy, epsilon=more))))
    advice = []
    for change, changed_study, changed_site in candidates:
        try:
            _, plan = site_plan(changed_study, changed_site, train_rows)
        except BudgetTooLow:
            advice.append(Advice(change, None))
            continue
        if plan is not None:
            advice.append(Advice(change, utility(plan, train_rows, parameters).noise_to_signal))
    return sorted(advice, key=lambda a: math.inf if a.noise_to_signal is None else a.noise_to_signal)


def advise(
    study: StudyConfig, site: SiteSpec, train_rows: int, parameters: int, current: Utility | None
) -> list[str]:
    """What would help a site most, in words: empty when its plan does not drown the signal.

    Args:
        study: the study.
        site: the site.
        train_rows: its training rows.
        parameters: the model's parameters.
        current: its plan's figures (None: no plan fits its budget at all).

    Returns:
        Lines of advice, the most effective change first.
    """
    if current is not None and not current.drowned:
        return []
    lines = []
    for option in alternatives(study, site, train_rows, parameters)[:2]:
        if option.noise_to_signal is not None:
            lines.append(f"{option.change}: noise-to-signal {option.noise_to_signal:.3g}")
    if not study.personalization.enabled:
        lines.append("[personalization] method = \"finetune\": a model adapted to the site's own rows "
                     "(its steps are planned within the same budget)")
    return lines


@dataclass(frozen=True)
class SiteReport:
    """`pmfl plan`'s line for one site: its plan, what it means for learning, and advice."""

    site: str
    train_rows: int
    epsilon_budget: float | None  # None: the site trains without DP
    planned_rounds: int
    plan: PrivacyPlan | None
    utility: Utility | None
    advice: list[str]
    declines: str = ""  # why no plan fits the budget at all


def site_report(study: StudyConfig, site: SiteSpec, train_rows: int, parameters: int | None = None
                ) -> SiteReport:
    """Plan one site by `site_plan` and judge the plan (the whole of `pmfl plan` for one site).

    Args:
        study: the study.
        site: the site with its budget.
        train_rows: its training rows (as the site discloses them, or counted from its file).
        parameters: the model's parameters (None: `model_parameters(study)`).

    Returns:
        The site's report; `declines` says why when no noise multiplier fits its budget.
    """
    budget = site.privacy.epsilon if site.privacy.dp else None
    parameters = model_parameters(study) if parameters is None else parameters
    try:
        planned, plan = site_plan(study, site, train_rows)
    except BudgetTooLow as exc:
        return SiteReport(site.name, train_rows, budget, planned_rounds(study, site.privacy), None, None,
                          advise(study, site, train_rows, parameters, None), declines=str(exc))
    judged = utility(plan, train_rows, parameters) if plan is not None else None
    advice = advise(study, site, train_rows, parameters, judged) if judged is not None else []
    return SiteReport(site.name, train_rows, budget, planned, plan, judged, advice)
