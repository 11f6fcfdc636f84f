"""The interface every prediction task implements, and what all of them share.

The sites' training loop, the privacy machinery, the ledger and the coordinator are shared; a task
only says how a site loads its data, which model and loss the study uses, which metrics a site may
report and when its data cannot teach anything. One pipeline, several kinds of question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from pm_common.data.contract import DataContract
from pm_common.study.config import SiteSpec, StudyConfig


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
    headline: str  # the metric a run's summary and the baseline flag use
    higher_is_better: bool
    shown: tuple[str, ...]  # the metrics the final table shows, in order

    def build_model(self, study: StudyConfig, seed: int = 0) -> nn.Module: ...

    def criterion(self) -> nn.Module: ...

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]: ...

    def load_site(self, spec: SiteSpec, study: StudyConfig) -> SiteTensors: ...

    def describe_model(self, study: StudyConfig) -> dict[str, Any]: ...

    def unlearnable(self, train_y: torch.Tensor) -> str: ...

    def baseline(self, train_y: torch.Tensor, test_y: torch.Tensor) -> float: ...


@runtime_checkable
class Predictor(Protocol):
    """A task that turns its model's outputs on new rows into the columns `pmfl predict` writes."""

    def predictions(self, outputs: torch.Tensor) -> dict[str, np.ndarray]: ...


def unit_suffix(unit: str) -> str:
    """A unit as the end of a column name: `_days`, `_mg/dl`; '' when none is declared."""
    return "_" + "_".join(unit.split()) if unit.strip() else ""


def evaluate_with_baseline(
    task: Task, outputs: torch.Tensor, train_y: torch.Tensor, test_y: torch.Tensor
) -> dict[str, float]:
    """A site's test metrics with its trivial baseline beside them, and whether the model beat it.

    Why: a model no better than "always the majority class" (or the training mean, or a constant
    risk) has learnt nothing a site could use, whatever its accuracy looks like; the run says so.

    Args:
        task: the study's task.
        outputs: the model's outputs on the site's test rows.
        train_y: the site's training labels (the baseline is fitted on them alone).
        test_y: the site's test labels.

    Returns:
        The task's metrics, plus `baseline` (the trivial predictor's headline metric on the same test
        rows) and `no_better_than_baseline` (1.0 or 0.0) when the headline metric is defined.
    """
    metrics = task.metrics(outputs, test_y)
    if task.headline not in metrics or len(train_y) == 0:
        return metrics
    baseline = task.baseline(train_y, test_y)
    value = metrics[task.headline]
    better = value > baseline if task.higher_is_better else value < baseline
    return {**metrics, "baseline": baseline, "no_better_than_baseline": 0.0 if better else 1.0}


def majority_logits(train_y: torch.Tensor, count: int, num_outputs: int) -> torch.Tensor:
    """Outputs that always predict the training labels' majority class (the classifiers' baseline).

    Args:
        train_y: training class indices (0/1 for binary).
        count: how many rows to predict.
        num_outputs: 1 for a binary logit, else one output per class.

    Returns:
        Logits of shape (count,) or (count, num_outputs).
    """
    majority = int(torch.mode(train_y.long()).values.item())
    if num_outputs == 1:
        return torch.full((count,), 10.0 if majority == 1 else -10.0)
    logits = torch.full((count, num_outputs), -10.0)
    logits[:, majority] = 10.0
    return logits


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




def contract_of(study: StudyConfig) -> DataContract:
    """The data contract of a tabular study (the study's checks guarantee one).

    Args:
        study: a tabular study.

    Returns:
        Its contract.

    Raises:
        ValueError: the study has no contract (an image study asked for a tabular task).
    """
    if study.contract is None:
        raise ValueError(f"study {study.name!r} has no data contract: not a tabular study")
    return study.contract


def tabular_site(spec: SiteSpec, study: StudyConfig, label_dtype: torch.dtype = torch.float32) -> SiteTensors:
    """A tabular site's rows, validated against the study's contract, as train/test tensors.

    Args:
        spec: the site (its data file, and its own test file when it declares one).
        study: the study (contract and split).
        label_dtype: what the task's loss takes (class indices are long).

    Returns:
        The site's tensors.
    """
    from pm_common.data.tabular import NumberFormat, load_site_split

    train, test = load_site_split(spec.data, spec.test_data, contract_of(study), delimiter=spec.delimiter,
                                  encoding=spec.encoding, test_fraction=study.split.test_fraction,
                                  seed=study.split.seed,
                                  number_format=NumberFormat(spec.thousands, spec.decimal))
    return SiteTensors(torch.from_numpy(train.x), torch.from_numpy(train.y).to(label_dtype),
                       torch.from_numpy(test.x), torch.from_numpy(test.y).to(label_dtype))
