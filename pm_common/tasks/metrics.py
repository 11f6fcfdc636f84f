"""Evaluation metrics a site may send: aggregates over its test rows, never per-patient values."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy, ROC AUC (when both classes are present) and n for one site's test set."""
    logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    correct = ((logits > 0).float() == labels).sum().item()
    metrics = {"loss": loss, "accuracy": correct / len(labels), "n": float(len(labels))}
    if 0 < labels.sum().item() < len(labels):
        metrics["auc"] = float(roc_auc_score(labels.numpy(), logits.numpy()))
    return metrics


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present in `labels` (as scikit-learn's). Under label skew plain
    accuracy rewards predicting a site's majority class; balanced accuracy scores that as chance."""
    predicted, labels = predicted.detach().cpu(), labels.detach().cpu()
    return float(np.mean([(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]))


def reportable(metrics: dict[str, float], min_count: int) -> bool:
    """Metrics over fewer than `min_count` records could single a patient out: do not send them."""
    return metrics.get("n", 0.0) >= min_count


def mean_over_sites(values: list[float]) -> float | None:
    """FLamby's metric: the unweighted mean of each site's local test accuracy."""
    return float(np.mean(values)) if values else None
