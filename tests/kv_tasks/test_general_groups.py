"""needles_general / needles_paper: resolution through lm-eval's TaskManager, and the offline error.

The hub is unreachable here, so the groups are resolved with lm-eval's own TaskManager/TaskFactory
up to the point where a task would load its dataset (harness_ext.tasklib.general.resolve_leaf_configs),
and the offline error is checked through the real `lm_eval` CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lm_eval_cli import lm_eval_command

from harness_ext.tasklib.general import PINNED, resolve_leaf_configs


@pytest.fixture(scope="module")
def paper():
    return resolve_leaf_configs(["needles_paper"])


def test_needles_general_resolves_to_lm_evals_tasks_with_pinned_settings(paper):
    leaves, groups = paper
    assert groups["needles_general"] == ["mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open"]
    general = [n for n in leaves if n in PINNED or n.startswith("mmlu_")]
    mmlu = [n for n in general if n.startswith("mmlu_")]
    assert len(mmlu) == 57
    for name in general:
        cfg = leaves[name]
        pin = PINNED["mmlu" if name.startswith("mmlu_") else name]
        source = cfg["metadata"]["config_source"]
        assert "/lm_eval/tasks/" in source, f"{name} must be lm-eval's own task, got {source}"
        assert cfg["num_fewshot"] == pin["num_fewshot"], name
        assert cfg["dataset_path"] == pin["dataset"], name
        assert float(cfg["metadata"]["version"]) == pin["version"], f"lm-eval changed {name}; re-pin it"
        assert cfg["class"].__name__ == "HubTask"
        metrics = {m["metric"] for m in cfg["metric_list"]}
        assert pin["metric"] in metrics, name
        if pin["filter"] != "none":
            assert pin["filter"] in {f["name"] for f in cfg["filter_list"]}, name
    assert leaves["hellaswag"]["output_type"] == "multiple_choice"
    assert {m["metric"] for m in leaves["hellaswag"]["metric_list"]} == {"acc", "acc_norm"}
    assert leaves["gsm8k"]["dataset_name"] == "main" and leaves["triviaqa"]["dataset_name"] == "rc.nocontext"


def test_needles_paper_runs_everything_the_paper_reports(paper):
    leaves, groups = paper
    assert groups["needles_paper"] == ["kv_retrieval", "mdqa20", "flenqa", "flenqa_cot", "needles_general"]
    assert groups["mdqa20"] == [f"mdqa20_pos{p}" for p in (1, 2, 5, 10, 15, 20)] + ["mdqa_closedbook", "mdqa_oracle"]
    assert groups["flenqa"] == ["flenqa_monorel", "flenqa_pir", "flenqa_ruletaker"]
    assert groups["flenqa_cot"] == ["flenqa_monorel_cot", "flenqa_pir_cot", "flenqa_ruletaker_cot"]
    assert leaves["mdqa20_pos10"]["dataset_kwargs"]["mdqa_task_position"] == 10
    assert leaves["mdqa20_pos10"]["generation_kwargs"]["max_gen_toks"] == 100
    assert leaves["flenqa_pir_cot"]["dataset_kwargs"] == {"flenqa_task": "pir", "flenqa_cot": True}
    for task in ("monorel", "pir", "ruletaker"):  # the reference's budget, which CoT needs, on every FLenQA task
        for suffix in ("", "_cot"):
            assert leaves[f"flenqa_{task}{suffix}"]["generation_kwargs"]["max_gen_toks"] == 400, task + suffix
            assert leaves[f"flenqa_{task}{suffix}"]["generation_kwargs"]["until"] == [], task + suffix
    assert len(leaves) == 3 + 8 + 6 + 61


def test_offline_error_names_the_dataset_and_the_fix(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        lm_eval_command(
            "--tasks", "needles_general", "--model", "dummy", "--limit", "1", "--output_path", str(tmp_path / "out")
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "needles: error:" in err and "Traceback" not in err, err[-3000:]
    assert "cais/mmlu" in err and "not in the local cache" in err  # the first member's dataset
    assert "needles data fetch general" in err and "datasets.load_dataset('cais/mmlu'" in err
    assert "Rowan/hellaswag" in err and "google-research-datasets/nq_open" in err  # every dataset the group needs


def test_needles_data_list_prints_the_resolution():
    proc = subprocess.run(
        [sys.executable, "-m", "harness_ext.cli", "data", "list", "needles_general"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert lines["gsm8k"][1] == "5" and lines["hellaswag"][1] == "0" and len(lines) == 61
