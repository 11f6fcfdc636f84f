"""Image classification from DICOM, PNG/JPEG folders or MedMNIST-style NPZ files."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pm_common.study.config import SiteSpec, StudyConfig
from pm_common.tasks.base import SiteTensors, majority_logits, single_class_reason
from pm_common.tasks.metrics import balanced_accuracy

NAME = "image-classification"


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

    name = NAME
    headline = "balanced_accuracy"
    higher_is_better = True
    shown: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auc")

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

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float:
        """Balanced accuracy of always predicting the training images' majority class."""
        classes = max(int(train_y.max().item()), int(test_y.max().item()) if len(test_y) else 0) + 1
        return multiclass_metrics(majority_logits(train_y, len(test_y), max(classes, 2)), test_y)[
            "balanced_accuracy"]

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


