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
    return float(np.mean([(predicted[labels == c] == c).float().mean().item() for c in torch.unique(labels)]))


def reportable(metrics: dict[str, float], min_count: int) -> bool:
    """Metrics over fewer than `min_count` records could single a patient out: do not send them."""
    return metrics.get("n", 0.0) >= min_count


def mean_over_sites(values: list[float]) -> float | None:
    """FLamby's metric: the unweighted mean of each site's local test accuracy."""
    return float(np.mean(values)) if values else None


def class_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]
) -> dict[str, float]:
    """Several classes: loss, accuracy, balanced accuracy, macro-F1, recall per declared class present
    (`recall_<class>`), one-vs-rest ROC AUC averaged over the classes present with both outcomes, n.

    Args:
        logits: (n, classes) model outputs.
        labels: (n,) class indices.
        classes: the declared class codes (they name the per-class recalls).

    Returns:
        The metrics (aggregates over the site's test rows only).
    """
    from sklearn.metrics import f1_score

    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    predicted = logits.argmax(1)
    macro_f1 = f1_score(labels.numpy(), predicted.numpy(), average="macro", zero_division=0)
    metrics = {"loss": nn.functional.cross_entropy(logits, labels).item(),
               "accuracy": (predicted == labels).float().mean().item(),
               "balanced_accuracy": balanced_accuracy(predicted, labels),
               "macro_f1": float(macro_f1),
               "n": float(len(labels))}
    for c in torch.unique(labels).tolist():
        metrics[f"recall_{classes[c]}"] = (predicted[labels == c] == c).float().mean().item()
    probabilities = torch.softmax(logits, 1).numpy()
    aucs = [roc_auc_score(labels.numpy() == c, probabilities[:, c]) for c in range(logits.shape[1])
            if 0 < int((labels == c).sum()) < len(labels)]
    if aucs:
        metrics["auc"] = float(np.mean(aucs))
    return metrics


def regression_metrics(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """MAE and RMSE in the target's unit, R² (when the test values vary), n.

    Args:
        predicted: predictions in the target's unit.
        actual: true values in the target's unit.

    Returns:
        The metrics.
    """
    error = predicted - actual
    metrics = {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean())),
               "n": float(len(actual))}
    spread = float(((actual - actual.mean()) ** 2).sum())
    if len(actual) > 1 and spread > 0:
        metrics["r2"] = 1.0 - float((error**2).sum()) / spread
    return metrics


def harrell_c_index(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float | None:
    """Harrell's concordance: among pairs where the earlier time is an observed event, the share in
    which that patient has the higher predicted risk (ties in risk count one half).

    Args:
        risk: predicted risk per patient (higher: earlier event).
        time: follow-up time.
        event: 1 where the event was observed, 0 when censored.

    Returns:
        The C-index, or None when no pair is comparable.
    """
    earlier = (time[:, None] < time[None, :]) & (event[:, None] == 1)
    comparable = int(earlier.sum())
    if comparable == 0:
        return None
    concordant = (risk[:, None] > risk[None, :]) & earlier
    tied = (risk[:, None] == risk[None, :]) & earlier
    return (float(concordant.sum()) + 0.5 * float(tied.sum())) / comparable
