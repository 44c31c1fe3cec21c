"""lm-eval glue for the continuation-loss task (the family lives in harness_ext.tasklib.long_ppl)."""

from __future__ import annotations

import datasets
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from harness_ext.plugin.task_base import NeedlesTask
from harness_ext.tasklib.breakdowns import parse_name
from harness_ext.tasklib.long_ppl import check_plain_prompt, long_ppl_dataset, perplexity_of, process_results

__all__ = ["LongPPLTask", "doc_to_target", "doc_to_text", "needles_long_ppl", "perplexity_of", "process_results"]

# Per-length keys aggregate as their overall metric: NLL by its mean (numeric stderr), perplexity as exp(mean NLL).
_AGGREGATIONS = {"nll": mean, "ppl": perplexity_of}


class LongPPLTask(NeedlesTask):
    def fewshot_context(self, doc, num_fewshot, system_instruction=None, apply_chat_template=False, **kwargs):
        check_plain_prompt(self.config.task, num_fewshot, system_instruction, apply_chat_template)
        return super().fewshot_context(doc, num_fewshot, system_instruction, apply_chat_template, **kwargs)

    def process_results(self, doc, results):
        scores = ConfigurableTask.process_results(self, doc, results)
        for key in scores:
            if key not in self._aggregation_list:  # lower is better for every key of this task
                self._aggregation_list[key] = _AGGREGATIONS[parse_name(key).base]
                self._higher_is_better[key] = False
        return scores


def needles_long_ppl(**metadata) -> datasets.DatasetDict:
    return long_ppl_dataset("needles_long_ppl", metadata)


def doc_to_text(doc: dict) -> str:
    return doc["context"]


def doc_to_target(doc: dict) -> str:
    return doc["continuation"]  # starts with its own space: no target delimiter
