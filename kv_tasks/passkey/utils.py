"""lm-eval glue for the passkey task (the family lives in harness_ext.tasklib.passkey)."""

from __future__ import annotations

import datasets

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.passkey import passkey_dataset, process_results

__all__ = ["PasskeyTask", "needles_passkey", "process_results"]

PasskeyTask = NeedlesTask


def needles_passkey(**metadata) -> datasets.DatasetDict:
    return passkey_dataset("needles_passkey", metadata)
