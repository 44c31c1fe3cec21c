"""lm-eval's own general benchmarks, as used by the ``needles_general`` group.

The group (needles_general.yaml) sets ``class: !function utils.HubTask`` on each member. The
override reaches every leaf task (MMLU's 57 subjects included) and changes one thing: when the
task's Hugging Face dataset is neither cached nor reachable, the user gets a NeedlesError that
names the dataset and how to pre-download it, instead of a retry loop and a traceback.
"""

from __future__ import annotations

from lm_eval.api.task import ConfigurableTask

from harness_ext.errors import NeedlesError

# What the group runs: lm-eval task -> (shots, metric reported, filter), and the task version at lm-eval 0.4.13.
# Kept here (and checked by tests/test_general_groups.py) so a change of lm-eval's task is noticed.
PINNED = {
    "mmlu": {"num_fewshot": 0, "metric": "acc", "filter": "none", "version": 1.0, "dataset": "cais/mmlu"},
    "hellaswag": {"num_fewshot": 0, "metric": "acc", "filter": "none", "version": 1.0, "dataset": "Rowan/hellaswag"},
    "gsm8k": {
        "num_fewshot": 5,
        "metric": "exact_match",
        "filter": "strict-match",
        "version": 3.0,
        "dataset": "openai/gsm8k",
    },
    "triviaqa": {
        "num_fewshot": 0,
        "metric": "exact_match",
        "filter": "remove_whitespace",
        "version": 3.0,
        "dataset": "mandarjoshi/trivia_qa",
    },
    "nq_open": {
        "num_fewshot": 0,
        "metric": "exact_match",
        "filter": "remove_whitespace",
        "version": 4.0,
        "dataset": "google-research-datasets/nq_open",
    },
}


def predownload_command(path: str, name: str | None) -> str:
    args = f"'{path}'" + (f", '{name}'" if name else "")
    return f'python -c "import datasets; datasets.load_dataset({args})"'


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


# ---------------------------------------------------------------------------------- resolution
def resolve_leaf_configs(names: list[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(leaf task name -> the config lm-eval would build it with, group -> children), nothing downloaded.

    Runs lm-eval's own TaskManager and TaskFactory (group overrides, includes, metadata merge) and
    stops just before a leaf task is constructed, because construction loads its dataset.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    captured: dict[str, dict] = {}

    class _Leaf:
        def __init__(self, name: str) -> None:
            self.task_name = name

    class _ResolvingFactory(TaskFactory):
        def _build_task(self, entry, overrides):
            cfg = self._load_full_config(entry, overrides)
            for key in ("tag", "group", "task_list"):  # as TaskFactory._build_task does
                cfg.pop(key, None)
            captured[cfg["task"]] = cfg
            return _Leaf(cfg["task"])

    manager = TaskManager()
    if not isinstance(getattr(manager, "_factory", None), TaskFactory):
        raise NeedlesError("this lm-eval version builds tasks differently", fix="use lm-eval 0.4.13 (pyproject pin)")
    manager._factory = _ResolvingFactory(meta=None)
    loaded = manager.load(list(names))
    return captured, loaded["group_map"]


def hub_datasets(names: list[str]) -> list[tuple[str, str | None]]:
    """The distinct (dataset_path, dataset_name) the leaf tasks of ``names`` load from the hub."""
    leaves, _ = resolve_leaf_configs(names)
    seen: dict[tuple[str, str | None], None] = {}
    for cfg in leaves.values():
        if cfg.get("dataset_path"):
            seen[(cfg["dataset_path"], cfg.get("dataset_name"))] = None
    return list(seen)
