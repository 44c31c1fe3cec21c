"""lm-eval glue for the SummHay citation task (the family lives in harness_ext.tasklib.summhay)."""

from __future__ import annotations

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.summhay import process_results, summhay_dataset

__all__ = ["SummhayTask", "process_results", "summhay_dataset"]

SummhayTask = NeedlesTask  # metric set follows the data (length / placement), marks non-official data
