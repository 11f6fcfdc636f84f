"""Everything a simulation checks before any process starts, and what `pmfl simulate --dry-run` shows.

Why: a study that starts and then fails at every site in every round wastes the researcher's time
and says nothing useful. Before Flower starts, every problem the study's sites would meet is
collected: the study's attackers (`[simulation]`), every site's data against the contract, and
each site's DP-SGD plan, computed exactly as its ClientApp will (pm_common/privacy/planner.py
`site_plan`, the one helper both use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pm_common.data.imaging import ImageDataError
from pm_common.data.tabular import MAX_LISTED_PROBLEMS, DataValidationError
from pm_common.models.layers import local_layer_problems
from pm_common.privacy.accountant import BudgetTooLow, PrivacyPlan
from pm_common.privacy.planner import site_plan
from pm_common.redaction import one_line
from pm_common.study.config import SiteSpec, StudyConfig, site_place
from pm_common.tasks import SiteTensors, few_rows_warning, task_of
from simulations.attacks import study_attacks


class SiteDataError(ValueError):
    """The simulated sites' data or DP plans cannot run the study; `problems`: one line each, each
    naming the site (`[[sites]] 'cleveland'`). Data problems name columns and data rows, never cells."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class SitePreflight:
    """One simulated site as its ClientApp will meet the study."""

    site: SiteSpec
    data: SiteTensors
    planned_rounds: int
    plan: PrivacyPlan | None  # None: the site trains without DP (`dp = false`), or declines
    declines: str = ""  # why the site will decline every round (its budget, its data): it still takes part
    warning: str = ""  # what the site will tell the study (e.g. too few rows to learn much)

    @property
    def train_rows(self) -> int:
        return len(self.data.train_y)

    @property
    def test_rows(self) -> int:
        return len(self.data.test_y)

    def describe(self) -> str:
        """One line: rows, sampling rate, steps and noise multiplier."""
        rows = f"{self.site.name}: {self.train_rows} train / {self.test_rows} test rows"
        if self.data.skipped:
            rows += f" ({len(self.data.skipped)} files skipped)"
        if self.warning:
            rows += f" (warning: {self.warning})"
        if self.declines:
            return f"{rows}; DECLINES every round: {self.declines}"
        if self.plan is None:
            return f"{rows}; dp = false: trains WITHOUT differential privacy, {self.planned_rounds} rounds"
        plan = self.plan
        return (
            f"{rows}; sampling rate {plan.sample_rate:.4g}, {plan.steps_per_round} steps per round x "
            f"{plan.planned_rounds} rounds"
            + (f" + {plan.personal_steps} personal steps" if plan.personal_steps else "")
            + f"; noise multiplier {plan.noise_multiplier:.4g} "
            f"(epsilon {plan.epsilon_budget:g}, delta {plan.delta:g}, {plan.accountant})"
        )


def _data_problems(place: str, exc: Exception) -> list[str]:
    if isinstance(exc, DataValidationError):
        described = [p.describe(exc.path) for p in exc.problems]
    elif isinstance(exc, ImageDataError) and exc.problems:
        described = [f"{name}: {why}" for name, why in exc.problems]
    else:
        return [f"{place}: {one_line(str(exc), 500)}"]
    lines = [f"{place}.data: {one_line(text, 500)}" for text in described[:MAX_LISTED_PROBLEMS]]
    if len(described) > MAX_LISTED_PROBLEMS:
        lines.append(f"{place}.data: ... and {len(described) - MAX_LISTED_PROBLEMS} more problems")
    return lines


def preflight(study: StudyConfig, *, plans: bool = True) -> list[SitePreflight]:
    """Check the study's attackers, every site's data and (with `plans`) every site's DP plan.

    Args:
        study: a checked study with `[[sites]]`.
        plans: also compute each site's DP-SGD plan (without: `plan` is None for every site).

    Returns:
        Each site as its ClientApp will meet the study, in `[[sites]]` order.

    Raises:
        StudyConfigError: `[simulation]` names an unknown site or a malformed attack.
        SiteDataError: fedper's local layers do not split the model; or every data or planning
            problem of every site, one line each.
    """
    study_attacks(study)
    if not study.sites:
        raise SiteDataError(["[[sites]]: the study declares no sites to simulate"])
    task = task_of(study)
    layers = study.personalization.local_layers  # fedper: the layers must exist, and not be all
    if layers and (wrong := local_layer_problems(task.build_model(study).state_dict(), layers,
                                                 study.model.name)):
        raise SiteDataError(wrong)
    problems: list[str] = []
    sites: list[SitePreflight] = []
    for site in study.sites:
        place = site_place(site.name)
        try:
            data = task.load_site(site, study)
        except ValueError as exc:  # DataValidationError, ImageDataError, or e.g. an unsplittable table
            problems.extend(_data_problems(place, exc))
            continue
        warning = few_rows_warning(len(data.train_y))
        unlearnable = task.unlearnable(data.train_y)
        if not plans:
            sites.append(SitePreflight(site, data, study.rounds, None, unlearnable, warning))
            continue
        try:
            planned, plan = site_plan(study, site, len(data.train_y))
        except BudgetTooLow as exc:  # the site's own budget: it takes part, declining with the reason
            sites.append(SitePreflight(site, data, study.rounds, None, str(exc), warning))
            continue
        except ValueError as exc:  # a plan too long for prv
            problems.append(f"{place}: no DP-SGD plan: {one_line(str(exc), 500)} (settings: [privacy] or "
                            "the site's own epsilon/delta, [study].rounds, [training])")
            continue
        sites.append(SitePreflight(site, data, planned, plan, unlearnable, warning))
    if problems:
        raise SiteDataError(problems)
    return sites

