"""lm-eval glue for ``needles_general``: lm-eval's own tasks with an offline error that names the fix.

The group (needles_general.yaml) sets ``class: !function utils.HubTask`` on each member. The
override reaches every leaf task (MMLU's 57 subjects included) and changes one thing: when the
task's Hugging Face dataset is neither cached nor reachable, the user gets a NeedlesError that
names the dataset and how to pre-download it, instead of a retry loop and a traceback.
"""

from __future__ import annotations

from lm_eval.api.task import ConfigurableTask

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.general import PINNED, predownload_command


class HubTask(ConfigurableTask):
    """A plain lm-eval task whose offline failure names the missing dataset and the fix."""

    def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config: dict | None = None) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, download_mode=download_mode, config=config)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        try:
            super().download(dataset_kwargs, **kwargs)
        except (ConnectionError, OSError) as exc:  # datasets raises ConnectionError (an OSError) offline
            path, name = self.config.dataset_path, self.config.dataset_name
            dataset = f"{path}" + (f" (config {name})" if name else "")
            raise NeedlesError(
                f"task {self.config.task}: the Hugging Face dataset {dataset} is not in the local cache and the hub "
                f"cannot be reached ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                fix="pre-download it on a machine with hub access: `needles data fetch general` (all datasets of "
                f"needles_general: {', '.join(p['dataset'] for p in PINNED.values())}) or "
                f"{predownload_command(path, name)}; then copy the Hugging Face cache ($HF_HOME, default "
                "~/.cache/huggingface) here and run with HF_DATASETS_OFFLINE=1",
            ) from exc
