"""lm-eval glue for the MuSiQue task (the family lives in harness_ext.tasklib.musique)."""

from __future__ import annotations

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.musique import musique_dataset, process_results

__all__ = ["MusiqueTask", "musique_dataset", "process_results"]

MusiqueTask = NeedlesTask  # metric set follows the data (length / placement / hops), marks non-official data
