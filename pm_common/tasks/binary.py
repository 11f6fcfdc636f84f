"""Binary risk prediction from a validated table (the study's data contract)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks.base import SiteTensors, contract_of, majority_logits, single_class_reason, tabular_site
from pm_common.tasks.metrics import binary_metrics

NAME = "binary-classification"


class TabularTask:
    """Binary risk prediction from a validated table (the data contract)."""

    name = NAME
    headline = "accuracy"
    higher_is_better = True
    shown: tuple[str, ...] = ("accuracy", "auc")

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, contract_of(study).num_inputs, study.model.hidden, seed)

    def criterion(self) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return binary_metrics(logits, labels)

    def predictions(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """The probability of the positive outcome and the class (1 when the logit is above 0, as the
        accuracy in `metrics` counts it)."""
        logits = outputs.detach().float().cpu().reshape(-1)
        return {"probability": torch.sigmoid(logits).numpy(), "class": (logits > 0).long().numpy()}

    def unlearnable(self, train_y: torch.Tensor) -> str:
        return single_class_reason(train_y)

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float:
        """Accuracy of always predicting the training rows' majority label."""
        return binary_metrics(majority_logits(train_y, len(test_y), 1), test_y)["accuracy"]

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors:
        return tabular_site(spec, study)

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {"model": study.model.name, "num_inputs": contract_of(study).num_inputs,
                "hidden": list(study.model.hidden), "inputs": contract_of(study).encoded_names(),
                "grad_sample_mode": study.training.grad_sample_mode}


