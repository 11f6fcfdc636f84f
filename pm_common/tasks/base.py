"""The interface every prediction task implements, and what all of them share.

The sites' training loop, the privacy machinery, the ledger and the coordinator are shared; a task
only says how a site loads its data, which model and loss the study uses, which metrics a site may
report and when its data cannot teach anything. One pipeline, several kinds of question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

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


