"""lm-eval's own general benchmarks as the ``needles_general`` group pins them, and their resolution.

``PINNED`` holds shots, metric, filter and version per task; ``resolve_leaf_configs`` runs lm-eval's
TaskManager up to (not including) dataset loading, so ``needles data fetch general`` knows what to download.
"""

from __future__ import annotations

from harness_ext.core.errors import NeedlesError

# What the group runs: lm-eval task -> (shots, metric reported, filter), and the task version at lm-eval 0.4.13.
# Kept here (and checked by tests/kv_tasks/test_general_groups.py) so a change of lm-eval's task is noticed.
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
