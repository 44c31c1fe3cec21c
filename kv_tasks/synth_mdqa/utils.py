"""lm-eval glue for the synthetic MDQA tasks (the family lives in harness_ext.tasklib.synth_mdqa)."""

from __future__ import annotations

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.synth_mdqa import process_results, synth_dataset

__all__ = ["SynthMDQATask", "process_results", "synth_dataset"]

SynthMDQATask = NeedlesTask  # per-position breakdown keys get a mean aggregation (numeric stderr)
