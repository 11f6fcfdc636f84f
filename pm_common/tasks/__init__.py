"""What a study asks of the model (its prediction task), behind one small interface.

`task_of(study)` gives the study's task: `binary` (risk from a table), `multiclass`, `regression`,
`survival` (from a table) or `images` (image classification); `base` holds the interface and what
every task shares.
"""

from __future__ import annotations

from collections.abc import Callable

from pm_common.study.config import StudyConfig
from pm_common.tasks import binary, images, multiclass, regression, survival
from pm_common.tasks.base import (
    SiteTensors,
    Task,
    evaluate_with_baseline,
    few_rows_warning,
    single_class_reason,
)

__all__ = ["SiteTensors", "Task", "evaluate_with_baseline", "few_rows_warning", "single_class_reason",
           "task_of"]

TASKS: dict[str, Callable[[StudyConfig], Task]] = {
    binary.NAME: lambda study: binary.TabularTask(),
    images.NAME: lambda study: images.ImageTask(),
    multiclass.NAME: multiclass.MulticlassTask,
    regression.NAME: regression.RegressionTask,
    survival.NAME: survival.SurvivalTask,
}


def task_of(study: StudyConfig) -> Task:
    """The study's task (from `[study] task`).

    Args:
        study: the study.

    Returns:
        The task object the site and the coordinator use.
    """
    return TASKS[study.task](study)
