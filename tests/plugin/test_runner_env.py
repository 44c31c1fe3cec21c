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
