"""lm-eval glue for the MDQA tasks (Lost in the Middle; the family lives in harness_ext.tasklib.mdqa)."""

from __future__ import annotations

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.mdqa import doc_to_target, doc_to_text, mdqa_dataset, process_results, process_results_sweep

__all__ = ["MDQATask", "doc_to_target", "doc_to_text", "mdqa_dataset", "process_results", "process_results_sweep"]

MDQATask = NeedlesTask  # marks the alias of a task run on non-official data
