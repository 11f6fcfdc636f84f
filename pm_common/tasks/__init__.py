"""What differs between a tabular and an imaging study, behind one small interface.

The sites' training loop, the privacy machinery, the ledger and the coordinator are shared; a task
only says how a site loads its data, which model and loss the study uses and which metrics a site
may report. One pipeline, two kinds of data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pm_common.models.tabular import build_tabular_model
from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks.metrics import balanced_accuracy, binary_metrics

TABULAR = "binary-classification"
IMAGING = "image-classification"


@dataclass(frozen=True)
class SiteTensors:
    """A site's own train/test split. It never leaves the site; only counts are ever reported."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    skipped: tuple[tuple[str, str], ...] = ()  # (file, why) left out by `on_bad_file = "skip"`


class Task(Protocol):
    name: str

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module: ...

    def criterion(self) -> nn.Module: ...

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]: ...

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors: ...

    def describe_model(self, study: StudyConfig) -> dict[str, Any]: ...

    def unlearnable(self, train_y: torch.Tensor) -> str: ...


FEW_TRAINING_ROWS = 20
"""Below this many training rows a site still trains, but says that DP noise will likely drown
what it learns (its reply carries the warning; the run shows it)."""


def few_rows_warning(train_rows: int) -> str:
    """What a site with this few training rows tells the study ('' when it has enough)."""
    if train_rows < FEW_TRAINING_ROWS:
        return (
            f"only {train_rows} training rows: DP-SGD noise will likely drown what this site's data can "
            f"teach (fewer than {FEW_TRAINING_ROWS})"
        )
    return ""


def single_class_reason(train_y: torch.Tensor) -> str:
    """Why a classifier cannot learn from these labels ('' if it can): all of one class."""
    if len(train_y) == 0:
        return "cannot learn: the site has no training rows"
    classes = torch.unique(train_y)
    if len(classes) < 2:
        return (
            f"cannot learn: all {len(train_y)} training rows have the same label, so they teach the model "
            "nothing about telling the classes apart"
        )
    return ""


class TabularTask:
    """Binary risk prediction from a validated table (the data contract)."""

    name = TABULAR

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        return build_tabular_model(study.model.name, study.contract.num_inputs, study.model.hidden, seed)

    def criterion(self) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return binary_metrics(logits, labels)

    def unlearnable(self, train_y: torch.Tensor) -> str:
        return single_class_reason(train_y)

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors:
        from pm_common.data.tabular import load_site_table, split_train_test

        table = load_site_table(spec.data, study.contract, delimiter=spec.delimiter, encoding=spec.encoding)
        train, test = split_train_test(table, test_fraction=study.split.test_fraction, seed=study.split.seed)
        return SiteTensors(torch.from_numpy(train.x), torch.from_numpy(train.y),
                           torch.from_numpy(test.x), torch.from_numpy(test.y))

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        return {"model": study.model.name, "num_inputs": study.contract.num_inputs,
                "hidden": list(study.model.hidden), "inputs": study.contract.encoded_names(),
                "grad_sample_mode": study.training.grad_sample_mode}


def multiclass_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, accuracy, balanced accuracy, ROC AUC (one-vs-rest for more than two classes,
    when defined), n."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    loss = nn.functional.cross_entropy(logits, labels).item()
    predicted = logits.argmax(1)
    metrics = {"loss": loss, "accuracy": (predicted == labels).float().mean().item(),
               "balanced_accuracy": balanced_accuracy(predicted, labels), "n": float(len(labels))}
    probabilities = torch.softmax(logits, 1).numpy()
    present = np.unique(labels.numpy())
    if len(present) == logits.shape[1] == 2:
        metrics["auc"] = float(roc_auc_score(labels.numpy(), probabilities[:, 1]))
    elif len(present) == logits.shape[1] > 2:
        metrics["auc"] = float(roc_auc_score(labels.numpy(), probabilities, multi_class="ovr"))
    return metrics


class ImageTask:
    """Image classification from DICOM, PNG/JPEG folders or MedMNIST-style NPZ files."""

    name = IMAGING

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module:
        from pm_common.models.images import build_image_model

        spec = study.images
        assert spec is not None
        torch.manual_seed(seed)
        return build_image_model(study.model.name, spec.channels, len(spec.classes), spec.size[0])

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return multiclass_metrics(logits, labels)

    def unlearnable(self, train_y: torch.Tensor) -> str:
        return single_class_reason(train_y)

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors:
        from pm_common.data.imaging import load_image_site

        assert study.images is not None
        source = {"path": str(spec.data), "test_fraction": study.split.test_fraction,
                  "seed": study.split.seed, **dict(spec.image_source)}
        data = load_image_site(source, study.images)
        return SiteTensors(data.train_x, data.train_y, data.test_x, data.test_y, tuple(data.skipped))

    def describe_model(self, study: StudyConfig) -> dict[str, Any]:
        assert study.images is not None
        return {"model": study.model.name, "image_size": list(study.images.size),
                "channels": study.images.channels, "classes": list(study.images.classes),
                "grad_sample_mode": study.training.grad_sample_mode}


def task_of(study: StudyConfig) -> Task:
    return ImageTask() if study.task == IMAGING else TabularTask()
