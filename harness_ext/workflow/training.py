"""The FinetuneConfig a suite's training runs with: its recipe (a packaged name or a YAML path) under the
spec's ``finetune`` keys, checked against the suite's documents (never trained on what is scored)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from harness_ext.workflow.suite import ExperimentConfig

KV_TASK = re.compile(r"^kv_retrieval_(simple|simple_template|multisubkey)$")
# tasks whose documents finetune.leakage can load (kv_retrieval, synth_mdqa, mdqa, niah, musique, summhay, passkey)
FAMILY_TASK = re.compile(r"^(kv_retrieval|synth_mdqa|mdqa|niah|musique|summhay_citation|needles_passkey)(_\w+)?$")


def finetune_config(cfg: ExperimentConfig, out: Path):
    """The FinetuneConfig of the experiment: its recipe (packaged name or YAML path) < its `finetune` keys."""
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.finetune.config import load_config, packaged_config, validate_hparams
    from harness_ext.finetune.data import train_spec
    from harness_ext.finetune.families import data_family

    values = dict(cfg.finetune)
    recipe = values.pop("recipe", None)
    path = None
    if recipe:
        path = Path(recipe) if Path(recipe).is_file() else packaged_config(str(recipe))
    kv_tasks = [t for t in cfg.tasks if KV_TASK.match(t)]
    kv_keys = ("lengths", "depths", "num_samples", "seed", "num_dicts")
    values |= {
        "model": cfg.model,
        "output_dir": str(out / "finetune"),
        # the KV documents the suite scores must never be trained on (checked by hash in the recipe)
        "eval_tasks": kv_tasks or ["kv_retrieval_simple"],
        "eval_metadata": {k: v for k, v in cfg.metadata.items() if k in kv_keys},
    }
    ft = load_config(path, values)
    if data_family(ft.data) != "kv":
        # synthetic MDQA data: check it against every suite task whose documents the leakage check can load
        checked = [t for t in cfg.tasks if FAMILY_TASK.match(t)]
        ft = dataclasses.replace(ft, eval_tasks=checked or ft.eval_tasks, eval_metadata=dict(cfg.metadata))
    validate_hparams(ft)
    train_spec(ft.data)  # the training data's spec too: a bad one must not wait for the base model's scores
    check_output_dir(out, "experiment folder")
    return ft
