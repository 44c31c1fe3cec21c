"""lm-eval glue for the synthetic KV-retrieval tasks (the family lives in harness_ext.tasklib.kv)."""

from __future__ import annotations

import datasets

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.kv import kv_dataset, process_results

__all__ = ["KVTask", "multisubkey", "process_results", "simple", "simple_template"]

KVTask = NeedlesTask


def simple(**metadata) -> datasets.DatasetDict:
    return kv_dataset("simple", False, metadata)


def simple_template(**metadata) -> datasets.DatasetDict:
    return kv_dataset("simple", True, metadata)


def multisubkey(**metadata) -> datasets.DatasetDict:
    return kv_dataset("multisubkey", True, metadata)
