"""A ConfigurableTask whose metric set follows the data: per-length / per-position breakdowns.

lm-eval fixes a task's metrics in YAML, but a sweep's lengths and positions come from
``--metadata`` at run time. ``process_results`` may therefore return breakdown keys such as
``both_acc_len4096_depth0.50``; this class registers each new key with a ``mean`` aggregation
(hence a numeric standard error) and higher-is-better, instead of lm-eval's "Using mean" warning.
It also records the generated data's SHA-256 in the task config, so results carry it, and marks
the alias of a task computed on non-official data (``needles_alias_marks``, see
harness_ext.data.sources), so no table shows a fixture's score under the benchmark's name.
"""

from __future__ import annotations

from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask


class NeedlesTask(ConfigurableTask):
    def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config: dict | None = None) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, download_mode=download_mode, config=config)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        super().download(dataset_kwargs, **kwargs)
        info = getattr(self.dataset, "needles_info", None)
        if info and isinstance(self.config.metadata, dict):
            self.config.metadata.update(info)
        meta = self.config.metadata if isinstance(self.config.metadata, dict) else {}
        marks = [m for m in (meta.get("needles_alias_marks") or []) if m]
        if marks:
            self.config.task_alias = f"{self.config.task_alias or self.config.task} [{'; '.join(marks)}]"

    def process_results(self, doc, results):
        scores = super().process_results(doc, results)
        for key in scores:
            if key not in self._aggregation_list:
                self._aggregation_list[key] = mean
                self._higher_is_better[key] = True
        return scores
