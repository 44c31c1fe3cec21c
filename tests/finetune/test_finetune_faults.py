"""Finetuning killed hard (SIGKILL) after a checkpoint and resumed with --resume ends exactly where an
uninterrupted run ends: the same adapter weights and the same loss history (CPU, fixed seed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "harness_ext.finetune", "--model", str(model), "-o", str(out),
        "--num-samples", "24", "--lengths", "128", "--eval-metadata", json.dumps(EVAL_META),
        "--batch-size", "2", "--lr", "5e-3", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1",
        "--epochs", "1", "--save-every", "1", "--keep-checkpoints", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_argv(tiny_llama_dir, out), check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.heavy
def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, straight, tmp_path):
    killed = tmp_path / "killed"

    proc = subprocess.Popen(_argv(tiny_llama_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step-2" / "needles_state.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no final save: whatever was mid-write stays half-written
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()

    # without --resume the folder's checkpoints are protected; with it the run continues from the newest complete one
    refused = subprocess.run(_argv(tiny_llama_dir, killed), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # ... unless the newest checkpoint was trained on other documents than the same options make now
    state_file = max((killed / "checkpoints").glob("step-*/needles_state.json"), key=lambda p: int(p.parent.name[5:]))
    state = json.loads(state_file.read_text())
    assert len(state["data_sha256"]) == 64
    state_file.write_text(json.dumps({**state, "data_sha256": "0" * 64}))
    other = subprocess.run(_argv(tiny_llama_dir, killed, "--resume"), capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "trained on other documents" in other.stderr and "Traceback" not in other.stderr
    state_file.write_text(json.dumps(state))
    resumed = subprocess.run(_argv(tiny_llama_dir, killed, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    history = [json.loads((d / "train_log.json").read_text()) for d in (straight, killed)]
    assert [r["loss"] for r in history[0]] == [r["loss"] for r in history[1]] and len(history[0]) == 12


@pytest.mark.heavy
def test_a_finished_run_is_reused_only_with_its_own_options_and_documents(tiny_llama_dir, straight, tmp_path):
    """What `needles experiment` / `needles study` do when a finetune step's marker is missing but its folder holds
    a finished run: reuse it only when the config would train the same thing now."""
    from harness_ext.core.errors import NeedlesError
    from harness_ext.finetune.args import finetune_parser, overrides_from_args
    from harness_ext.finetune.config import load_config
    from harness_ext.finetune.finished import finished_run

    out = tmp_path / "run"

    def config(*extra: str):
        argv = _argv(tiny_llama_dir, out, *extra)[3:]  # the flags after `python -m harness_ext.finetune`
        return load_config(None, overrides_from_args(finetune_parser().parse_args(argv)))

    assert finished_run(config()) is None  # nothing there: train
    out.mkdir()
    shutil.copy(straight / "manifest.json", out / "manifest.json")  # the finished run, as the steps find it
    assert finished_run(config("--save-every", "3"))["data"]["documents"] == 24  # checkpointing is not training
    with pytest.raises(NeedlesError, match=r"trained with other options \(epochs\)"):
        finished_run(config("--epochs", "2"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["data"]["data_sha256"] = "0" * 64  # what a change of the data family's generator looks like
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NeedlesError, match="trained on other documents") as exc:
        finished_run(config())
    assert f"delete {out}" in exc.value.fix


def test_a_checkpoint_fingerprinted_with_its_evaluation_options_resumes_with_the_same_ones(tmp_path):
    """Checkpoints whose fingerprint also covers --eval-tasks / --eval-metadata and the memory options (the strict
    rule) still resume, with the options they were written with; every training option still has to match."""
    import dataclasses

    from harness_ext.core.errors import NeedlesError
    from harness_ext.finetune.config import FinetuneConfig
    from harness_ext.finetune.rundir import STATE_FILE, latest_state, resumable_fingerprints
    from harness_ext.finetune.rundir import config_fingerprint as fingerprint

    cfg = FinetuneConfig(eval_tasks=["kv_retrieval_simple"])
    step = tmp_path / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    state = {"step": 3, "history": [], "config_fingerprint": fingerprint(cfg, strict=True), "processes": 1}
    (step / STATE_FILE).write_text(json.dumps(state))
    assert latest_state(tmp_path, resumable_fingerprints(cfg))[1]["step"] == 3
    for other in (
        {"eval_tasks": ["kv_retrieval_simple_template"]},
        {"gradient_checkpointing": True},
        {"learning_rate": 1e-3},
    ):
        with pytest.raises(NeedlesError, match="written with another configuration"):
            latest_state(tmp_path, resumable_fingerprints(dataclasses.replace(cfg, **other)))
    # config_fingerprint leaves the evaluation and memory options out: such a checkpoint resumes against another
    # suite with gradient checkpointing on; a training option still has to match
    state["config_fingerprint"] = fingerprint(cfg)
    (step / STATE_FILE).write_text(json.dumps(state))
    other = dataclasses.replace(
        cfg, eval_tasks=["kv_retrieval_simple_template"], eval_metadata={"lengths": [512]}, gradient_checkpointing=True
    )
    assert latest_state(tmp_path, resumable_fingerprints(other))[1]["step"] == 3
    with pytest.raises(NeedlesError, match="written with another configuration"):
        latest_state(tmp_path, resumable_fingerprints(dataclasses.replace(other, lora_r=4)))
