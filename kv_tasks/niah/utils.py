"""lm-eval glue for the natural-language NIAH tasks (the family lives in harness_ext.tasklib.niah)."""

from __future__ import annotations

import datasets

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.niah import niah_dataset, process_results

__all__ = ["NIAHTask", "niah_single", "process_results"]

NIAHTask = NeedlesTask


def niah_single(**metadata) -> datasets.DatasetDict:
    return niah_dataset("niah_single", metadata)
