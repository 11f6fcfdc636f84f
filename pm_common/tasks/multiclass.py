"""Several classes from a validated table: `[contract] target = { name, classes = [...] }`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pm_common.data.targets import MULTICLASS, ClassTarget
from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks.base import SiteTensors, contract_of, majority_logits, tabular_site
from pm_common.tasks.binary import TabularTask
from pm_common.tasks.metrics import class_metrics

NAME = MULTICLASS


class MulticlassTask(TabularTask):
    """One logit per declared class, cross-entropy (a sum of per-patient terms, as DP-SGD needs)."""

    name = NAME
    headline = "balanced_accuracy"  # under class imbalance plain accuracy rewards the majority class
    higher_is_better = True
    shown: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "auc")

    def __init__(self, study: StudyConfig) -> None:
        assert study.contract is not None and isinstance(study.contract.target, ClassTarget)
        self.classes = study.contract.target.classes

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, contract_of(study).num_inputs, study.model.hidden, seed,
                                   num_outputs=len(self.classes))

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return class_metrics(logits, labels, self.classes)

    def predictions(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """`probability_<class>` per declared class (softmax, as the AUC in `metrics` uses) and `class`,
        the declared code of the highest logit (as accuracy and recall count it)."""
        logits = outputs.detach().float().cpu()
        probabilities = torch.softmax(logits, 1).numpy()
        columns = {f"probability_{c}": probabilities[:, i] for i, c in enumerate(self.classes)}
        return {**columns, "class": np.asarray(self.classes, dtype=object)[logits.argmax(1).numpy()]}

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float:
        """Balanced accuracy of always predicting the training rows' majority class."""
        logits = majority_logits(train_y, len(test_y), len(self.classes))
        return class_metrics(logits, test_y, self.classes)["balanced_accuracy"]

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors:
        return tabular_site(spec, study, torch.long)

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {**super().describe_model(study), "classes": list(self.classes)}
