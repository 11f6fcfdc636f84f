"""Time to event with censoring: a discrete-time hazard model on the grid the study declares.

`[contract] target = { time, event, event_values, censored_values, time_unit, intervals, horizons }`.
The model gives one logit per interval of the grid; its sigmoid is the hazard h_k, the probability of
the event in interval k given survival to its start. A patient whose event falls in interval j adds
-[sum_{k<j} log(1 - h_k) + log h_j] to the loss; a patient censored at time T adds
-sum_{k: end_k <= T} log(1 - h_k) (the intervals it was seen to survive); a follow-up beyond the last
interval end is censored there. S(t) = prod_{k: end_k <= t} (1 - h_k).

Why this loss and not Cox's partial likelihood: DP-SGD clips each example's gradient and adds noise
calibrated to that clip, which bounds one patient's influence only if the batch loss is a sum of
per-patient terms, each depending on that patient's row alone. The negative log-likelihood above is
such a sum. A batch Cox partial likelihood is not: each event's term divides by the sum of
exp(risk) over its risk set, the other patients in the batch still at risk, so one patient's
"per-example" gradient changes with whoever else was sampled, per-example clipping no longer bounds
what one patient contributes, and the epsilon the accountant reports would not hold.
tests/test_tasks.py checks it: a patient's per-example gradient is the same whatever the rest of the
batch, and is not under a batch Cox loss.

Metrics: Harrell's C-index (risk: the cumulative hazard sum_k -log(1 - h_k) up to the last horizon)
and the integrated Brier score over the horizons, weighted by the inverse probability of censoring
(Graf et al. 1999) estimated by Kaplan-Meier on the site's own test rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pm_common.data.targets import SURVIVAL, SurvivalTarget
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import StudyConfig
from pm_common.tasks.base import contract_of, unit_suffix
from pm_common.tasks.binary import TabularTask
from pm_common.tasks.metrics import harrell_c_index

NAME = SURVIVAL
NO_SKILL_C_INDEX = 0.5  # a constant risk: every comparable pair tied


class DiscreteHazardLoss(nn.Module):
    """Mean over the batch of each patient's negative log-likelihood under the discrete-time hazards."""

    def __init__(self, interval_ends: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("ends", torch.tensor(interval_ends, dtype=torch.float32))

    def per_patient(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each patient's negative log-likelihood (shape (n,)): depends on that patient's row alone."""
        time, event = y[:, 0:1], y[:, 1:2]
        ends = torch.as_tensor(self.ends).to(logits.device)[None, :]
        beyond = time > ends[:, -1:]  # followed past the grid: censored at its last end
        observed = (event > 0) & ~beyond
        before = ends < time  # intervals that ended before the time
        in_interval = (time <= ends) & (torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1) < time)
        hit = observed & in_interval  # the interval of an observed event
        survived = torch.where(observed, before, ends <= time)
        terms = nn.functional.softplus(logits) * survived + nn.functional.softplus(-logits) * hit
        return terms.sum(1)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_patient(logits, y).sum() / max(len(y), 1)


def survival_curves(
    logits: torch.Tensor, interval_ends: tuple[float, ...], times: tuple[float, ...]
) -> np.ndarray:
    """S(t) for each patient at each of `times`, shape (n, len(times))."""
    log_survival = torch.cumsum(-nn.functional.softplus(logits.double()), 1).numpy()  # at each interval end
    ends = np.asarray(interval_ends)
    steps = np.searchsorted(ends, np.asarray(times), side="right")  # intervals ended by each time
    padded = np.concatenate([np.zeros((len(log_survival), 1)), log_survival], 1)
    curves: np.ndarray = np.exp(padded[:, steps])
    return curves


def _censoring_survival(time: np.ndarray, event: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Kaplan-Meier of the censoring distribution G(t) (censoring as the 'event'), evaluated at `at`."""
    order = np.unique(time)
    g, values = 1.0, []
    for t in order:
        at_risk = (time >= t).sum()
        censored = ((time == t) & (event == 0)).sum()
        g *= 1.0 - censored / at_risk if at_risk else 1.0
        values.append(g)
    index = np.searchsorted(order, at, side="right") - 1
    return np.where(index >= 0, np.asarray(values)[np.clip(index, 0, None)], 1.0)


def integrated_brier(curves: np.ndarray, horizons: tuple[float, ...], time: np.ndarray,
                     event: np.ndarray) -> float:
    """Graf's IPCW Brier score at each horizon, averaged over them (trapezoid rule when several).

    Args:
        curves: S(horizon) per patient, shape (n, len(horizons)).
        horizons: the evaluation times.
        time: follow-up times.
        event: 1 observed, 0 censored.

    Returns:
        The integrated Brier score (0 is perfect; 0.25 is a constant 0.5).
    """
    g_at_time = np.maximum(_censoring_survival(time, event, time - 1e-9), 1e-12)  # G(T-)
    scores = []
    for k, h in enumerate(horizons):
        s = curves[:, k]
        died = (time <= h) & (event == 1)
        alive = time > h
        g_h = max(float(_censoring_survival(time, event, np.array([h]))[0]), 1e-12)
        weighted = np.where(died, s**2 / g_at_time, 0.0) + np.where(alive, (1 - s) ** 2 / g_h, 0.0)
        scores.append(float(np.mean(weighted)))
    if len(horizons) == 1:
        return scores[0]
    return float(np.trapezoid(scores, horizons) / (horizons[-1] - horizons[0]))


def _as_grid(outputs: torch.Tensor) -> torch.Tensor:
    """The model's outputs as (n, intervals) on the CPU (a grid of one interval may come as (n,))."""
    logits = outputs.detach().float().cpu()
    return logits[:, None] if logits.ndim == 1 else logits


class SurvivalTask(TabularTask):
    """One hazard logit per interval of the declared grid; the discrete-time hazard likelihood."""

    name = NAME
    headline = "c_index"
    higher_is_better = True
    shown: tuple[str, ...] = ("c_index", "integrated_brier")

    def __init__(self, study: StudyConfig) -> None:
        assert study.contract is not None and isinstance(study.contract.target, SurvivalTarget)
        self.target = study.contract.target

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, contract_of(study).num_inputs, study.model.hidden, seed,
                                   num_outputs=len(self.target.intervals))

    def criterion(self) -> nn.Module:
        return DiscreteHazardLoss(self.target.intervals)

    @property
    def risk_intervals(self) -> int:
        """How many intervals the risk sums: those ended by the last horizon (at least the first)."""
        last = np.searchsorted(np.asarray(self.target.intervals), self.target.horizons[-1], side="right")
        return max(int(last), 1)

    def risk(self, logits: torch.Tensor) -> np.ndarray:
        """Cumulative hazard up to the last horizon: higher means an earlier expected event."""
        return nn.functional.softplus(logits.double())[:, : self.risk_intervals].sum(1).numpy()

    def predictions(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """`survival_at_<horizon>_<unit>`: S(horizon) at each of the study's horizons (the curves the
        Brier score scores), and `cumulative_hazard_to_<end>_<unit>`: the risk the C-index ranks
        (higher: an earlier expected event), summed over the intervals ended by the last horizon."""
        logits = _as_grid(outputs)
        unit = unit_suffix(self.target.time_unit)
        curves = survival_curves(logits, self.target.intervals, self.target.horizons)
        columns = {f"survival_at_{h:g}{unit}": curves[:, k] for k, h in enumerate(self.target.horizons)}
        end = self.target.intervals[self.risk_intervals - 1]
        return {**columns, f"cumulative_hazard_to_{end:g}{unit}": self.risk(logits)}

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        logits, labels = _as_grid(logits), labels.detach().float().cpu()
        time, event = labels[:, 0].double().numpy(), labels[:, 1].double().numpy()
        metrics = {"loss": float(self.criterion()(logits, labels).item()), "n": float(len(labels)),
                   "events": float(event.sum())}
        c_index = harrell_c_index(self.risk(logits), time, event)
        if c_index is not None:
            metrics["c_index"] = c_index
        curves = survival_curves(logits, self.target.intervals, self.target.horizons)
        metrics["integrated_brier"] = integrated_brier(curves, self.target.horizons, time, event)
        return metrics

    def unlearnable(self, train_y: torch.Tensor) -> str:
        if len(train_y) == 0:
            return "cannot learn: the site has no training rows"
        return ""

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float:
        """A constant risk ranks no pair: C-index 0.5."""
        return NO_SKILL_C_INDEX

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {**super().describe_model(study), "interval_ends": list(self.target.intervals),
                "horizons": list(self.target.horizons), "time_unit": self.target.time_unit}
