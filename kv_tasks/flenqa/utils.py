"""lm-eval glue for the FLenQA tasks (the family lives in harness_ext.tasklib.flenqa)."""

from __future__ import annotations

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.flenqa import doc_to_target, doc_to_text, flenqa_dataset, process_results

__all__ = ["FLenQATask", "doc_to_target", "doc_to_text", "flenqa_dataset", "process_results"]

FLenQATask = NeedlesTask  # marks the alias of a task run on non-official data
