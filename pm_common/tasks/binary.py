"""Binary risk prediction from a validated table (the study's data contract)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks.base import SiteTensors, single_class_reason
from pm_common.tasks.metrics import binary_metrics

NAME = "binary-classification"


class TabularTask:
    """Binary risk prediction from a validated table (the data contract)."""

    name = NAME

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden, seed)

    def criterion(self) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return binary_metrics(logits, labels)

    def unlearnable(self, train_y: torch.Tensor) -> str:
        return single_class_reason(train_y)

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors:
        from pm_common.data.tabular import NumberFormat, load_site_table, split_train_test

        table = load_site_table(spec.data, study.contract, delimiter=spec.delimiter, encoding=spec.encoding,
                                number_format=NumberFormat(spec.thousands, spec.decimal))
        train, test = split_train_test(table, test_fraction=study.split.test_fraction, seed=study.split.seed)
        return SiteTensors(torch.from_numpy(train.x), torch.from_numpy(train.y),
                           torch.from_numpy(test.x), torch.from_numpy(test.y))

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {"model": study.model.name, "num_inputs": study.contract.num_inputs,
                "hidden": list(study.model.hidden), "inputs": study.contract.encoded_names(),
                "grad_sample_mode": study.training.grad_sample_mode}


