"""How the experiment runs an evaluation: the environment `needles finetune` prints beside its eval commands
reaches the lm_eval subprocess, and the time limit follows the cost estimate instead of a fixed 1,800 s."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.run import eval_argv, lm_eval_step
from harness_ext.plugin import runner
from harness_ext.workflow import eval_step
from harness_ext.workflow.eval_step import eval_timeout, split_env, with_env

KV = "kv_retrieval_simple"


@pytest.fixture
def capped(tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama whose tokenizer caps vLLM's window at 512 tokens (model_max_length)."""
    folder = tmp_path / "capped"
    shutil.copytree(tiny_llama_dir, folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "model_max_length": 512}))
    return folder


def _cfg(model: Path, **extra) -> object:
    return experiment_from_dict(
        {"name": "e", "model": str(model), "max_model_len": 1024, "metadata": {"lengths": [256], "num_samples": 4},
         "suite": [{"task": KV, "role": "target", "metric": "value_acc"}], **extra}
    )  # fmt: skip


def test_the_experiment_runs_lm_eval_in_the_finetunes_printed_environment(capped, tmp_path, monkeypatch):
    argv = eval_argv(_cfg(capped), str(capped), tmp_path / "eval_base")
    # the same variables `needles finetune` prints before its eval command (plugin.runner.eval_env)
    assert runner.eval_env(capped, 1024) == {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    assert argv[:3] == ["env", "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1", "lm_eval"]
    seen = {}

    def fake(args, output_path, log_file=None, timeout=1800, progress=None, env=None):
        seen.update(args=args, env=env, timeout=timeout, out=output_path)
        return output_path / "results.json"

    monkeypatch.setattr(runner, "run_lm_eval", fake)
    lm_eval_step(argv, tmp_path / "eval_base")
    assert seen["env"] == {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} and seen["args"][:2] == ["--tasks", KV]
    assert "--output_path" not in seen["args"] and seen["timeout"] == eval_timeout(argv)
    # a model whose tokenizer sets no cap runs as before: no prefix
    assert eval_argv(_cfg(tmp_path), str(tmp_path / "none"), tmp_path / "x")[:2] == ["lm_eval", "run"]


def test_run_lm_eval_hands_the_environment_to_the_subprocess(tmp_path, monkeypatch):
    seen = {}

    def follow(cmd, env, log_file, timeout, echo):
        seen.update(env=env, timeout=timeout)
        Path(log_file).write_text("stopped here")
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(runner, "follow", follow)
    with pytest.raises(NeedlesError, match="exited with 3"):
        runner.run_lm_eval(["--tasks", KV], tmp_path, log_file=tmp_path / "l.log", timeout=77, env={"X_NEEDLES": "1"})
    assert seen["env"]["X_NEEDLES"] == "1" and seen["env"]["HF_HUB_OFFLINE"] == "1" and seen["timeout"] == 77


def test_env_prefix_round_trips():
    argv = ["lm_eval", "run", "--tasks", KV]
    assert split_env(with_env(argv, {"B": "2", "A": "1"})) == ({"A": "1", "B": "2"}, argv)
    assert with_env(argv, {}) == argv and split_env(argv) == ({}, argv)


def _argv(metadata: dict, tasks: str = KV, model_args: str = "pretrained=/nowhere,enforce_eager=True") -> list[str]:
    return ["lm_eval", "run", "--tasks", tasks, "--model", "vllm", "--model_args", model_args,
            "--metadata", json.dumps(metadata)]  # fmt: skip


def test_timeout_follows_the_estimate(monkeypatch, tmp_path):
    monkeypatch.delenv(eval_step.TIMEOUT_ENV, raising=False)
    small = _argv({"lengths": [256], "depths": None, "num_samples": 10})
    assert eval_timeout(small) == 1800  # never below the former fixed limit
    # the measured training-free evaluation: 38 prompts of 4K-16K took 1,194 s; the old 1,800 s left 1.5x
    long = _argv({"lengths": [4096, 7680, 12288, 15872], "depths": None, "num_samples": 8})
    prompt = 8 * 4 * (4096 + 7680 + 12288 + 15872) / 4
    expected = 4 * (120 + prompt / 280 + 32 * 64 / 10)
    assert eval_timeout(long) == int(expected) and eval_timeout(long) > 3 * 1194
    assert eval_timeout([*long, "--limit", "1"]) < eval_timeout(long)  # --limit scores fewer documents
    # tasks read at run time are not sized: each adds the floor
    assert eval_timeout(_argv({}, tasks=f"{KV},mdqa_closedbook")) == eval_timeout(_argv({})) + 1800
    # a larger model on the CPU engine is slower: scaled by layers x hidden^2 against SmolLM2-135M
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"num_hidden_layers": 60, "hidden_size": 1152}))
    scaled = eval_timeout(_argv(json.loads(long[-1]), model_args=f"pretrained={big},enforce_eager=True"))
    assert scaled == int(expected * 8)
    gpu = eval_timeout(_argv(json.loads(long[-1]), model_args=f"pretrained={big},max_model_len=16384"))
    assert gpu == int(expected)
    monkeypatch.setenv(eval_step.TIMEOUT_ENV, "99")
    assert eval_timeout(long) == 99
    monkeypatch.setenv(eval_step.TIMEOUT_ENV, "soon")
    with pytest.raises(NeedlesError, match="NEEDLES_EVAL_TIMEOUT_S"):
        eval_timeout(long)
