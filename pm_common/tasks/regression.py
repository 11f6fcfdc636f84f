"""A continuous outcome from a validated table: `[contract] target = { name, type = "numeric", min, max }`.

The target is mapped from its declared range onto [-1, 1] by the contract alone, identically at every
site (no site's mean or spread is used, so none leaks and every site trains on the same scale). The
loss is the mean squared error, a sum of per-patient terms, so DP-SGD's per-example clipping bounds
each patient's influence. Metrics are reported back in the target's unit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pm_common.data.targets import REGRESSION, NumericTarget
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import StudyConfig
from pm_common.tasks.base import contract_of, unit_suffix
from pm_common.tasks.binary import TabularTask
from pm_common.tasks.metrics import regression_metrics

NAME = REGRESSION


class RegressionTask(TabularTask):
    """One output: the scaled target; mean squared error."""

    name = NAME
    headline = "r2"
    higher_is_better = True
    shown: tuple[str, ...] = ("mae", "rmse", "r2")

    def __init__(self, study: StudyConfig) -> None:
        assert study.contract is not None and isinstance(study.contract.target, NumericTarget)
        self.target = study.contract.target

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, contract_of(study).num_inputs, study.model.hidden, seed)

    def criterion(self) -> nn.Module:
        return nn.MSELoss()

    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        predicted = self.target.unscale(outputs.detach().double().cpu().numpy())
        actual = self.target.unscale(labels.detach().double().cpu().numpy())
        return {"loss": float(nn.functional.mse_loss(outputs.float(), labels.float()).item()),
                **regression_metrics(predicted, actual)}

    def predictions(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """`predicted_<target>_<unit>`: the output mapped back from [-1, 1] to the target's unit, as
        `metrics` compares it."""
        name = f"predicted_{self.target.name}{unit_suffix(self.target.unit)}"
        return {name: self.target.unscale(outputs.detach().double().cpu().reshape(-1).numpy())}

    def unlearnable(self, train_y: torch.Tensor) -> str:
        if len(train_y) == 0:
            return "cannot learn: the site has no training rows"
        if len(torch.unique(train_y)) < 2:
            return f"cannot learn: all {len(train_y)} training rows have the same target value"
        return ""

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float:
        """R² of always predicting the training rows' mean (about 0 or below on the test rows)."""
        constant = torch.full_like(test_y, float(train_y.float().mean()))
        return self.metrics(constant, test_y).get("r2", 0.0)

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {**super().describe_model(study), "target_range": [self.target.min, self.target.max],
                "unit": self.target.unit}
