"""Finetuning under real 2-process DDP (``accelerate launch``, gloo on CPU) on the tiny random Llama.

One test, four runs of the real entry point (``-m harness_ext.finetune``), no mocks:

- one process with ``--grad-accum 2``: the reference, same global batch (2 micro-batches of 2 per step);
- two processes (``--grad-accum 1``), uninterrupted;
- two processes stopped after a checkpoint (``--stop-after-steps``), then resumed with two processes
  (a one-process resume of that checkpoint is refused).

``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.15 (its CPU
launcher needs an MPI hostfile for more), so the runs use accelerate's torchrun launcher
(``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``: two processes, gloo DDP, on CPU.

Which samples each rank trains on is read from the recipe's own per-rank log
(``NEEDLES_FINETUNE_SAMPLE_LOG``, harness_ext/finetune/batches.py), ids being indices into
``train_docs.jsonl``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}
STEPS = 4  # 16 examples, micro-batches of 2, 2 micro-batches per step, one epoch
# Tolerances. DDP all-reduces the two ranks' gradients ((g0 + g1) / 2, gloo), one process accumulates
# g0 / 2 + g1 / 2 (accelerate scales the loss by 1/grad_accum). With two ranks both are exact in float32
# (halving is exact, a two-term sum commutes), and this machine gives bit-identical weights and losses. The
# tolerances leave room for per-process kernel choices (thread count, oneDNN) on other machines and for
# more ranks, where the all-reduce order matters. What they guard against is far larger: the loss logged
# from rank 0 alone (the bug this test found) was off by 0.025 at step 1, and another shard, global batch
# or dropout mask trains on other samples or masks.
LOSS_TOL = 1e-4  # absolute, on losses of about 10.7 logged to 5 decimals
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-6)  # LoRA weights of magnitude 1e-5..1e-1 after 4 AdamW steps


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "-o", str(out), "--num-samples", "16", "--lengths", "128",
        "--eval-metadata", json.dumps(EVAL_META), "--batch-size", "2", "--lr", "5e-3", "--lora-r", "8",
        "--lora-alpha", "16", "--lora-dropout", "0.1", "--epochs", "1", "--save-every", "2", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, args: list[str], sample_log: Path) -> subprocess.CompletedProcess:
    # one thread per process (as accelerate sets for its workers) so both topologies use the same kernels
    env = {**os.environ, "NEEDLES_FINETUNE_SAMPLE_LOG": str(sample_log), "CUDA_VISIBLE_DEVICES": ""}
    env["OMP_NUM_THREADS"] = "1"
    if processes == 1:
        cmd = [sys.executable, "-m", "harness_ext.finetune", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "harness_ext.finetune", *args,
        ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank-{rank}.jsonl").read_text().splitlines()]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _untimed(train_log: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in json.loads(train_log.read_text())]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_process_ddp_shards_data_matches_one_process_writes_once_and_resumes(tiny_llama_dir, tmp_path):
    single, ddp, stopped = tmp_path / "single", tmp_path / "ddp", tmp_path / "stopped"
    logs = {name: tmp_path / f"log-{name}" for name in ("single", "ddp", "stopped")}
    _ok(_run(1, _args(tiny_llama_dir, single, "--grad-accum", "2"), logs["single"]))
    out = _ok(_run(2, _args(tiny_llama_dir, ddp), logs["ddp"]))
    assert "2 process(es)" in out.stderr and "2 micro-batches of 2" in out.stderr
    assert out.stdout.count("lm_eval run") == 1  # the eval command is printed once, by rank 0

    # (a) disjoint shards: rank r trains on the micro-batch the one-process run took at accumulation step r
    reference = _log(logs["single"], 0)
    assert [(r["step"], r["micro"]) for r in reference] == [(s, m) for s in range(1, STEPS + 1) for m in (0, 1)]
    ranks = [_log(logs["ddp"], r) for r in (0, 1)]
    for rank, rows in enumerate(ranks):
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [r["ids"] for r in rows] == [r["ids"] for r in reference if r["micro"] == rank]
    for a, b in zip(*ranks, strict=True):
        assert not set(a["ids"]) & set(b["ids"]), (a, b)
    seen = sorted(i for rows in ranks for r in rows for i in r["ids"])
    assert seen == list(range(16))  # one epoch: every example exactly once, across both ranks

    # (b) same losses (every step, all ranks' samples) and same adapter as one process with the same global batch
    hist = {d: json.loads((d / "train_log.json").read_text()) for d in (single, ddp)}
    assert len(hist[ddp]) == STEPS
    for a, b in zip(hist[single], hist[ddp], strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a, b)
        assert (a["tokens"], a["label_tokens"], a["lr"]) == (b["tokens"], b["label_tokens"], b["lr"])
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (single, ddp))
    assert abs(m1["final_loss"] - m2["final_loss"]) <= LOSS_TOL
    w1, w2 = _adapter(single), _adapter(ddp)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], **WEIGHT_TOL), (k, (w1[k] - w2[k]).abs().max())

    # (c) rank 0 alone writes the outputs: the one-process run's files plus rank 1's RNG state in each
    # checkpoint (accelerate's per-process state), no temp or partial files, identical data outputs
    assert _files(ddp) == _files(single) | {"checkpoints/step-2/random_states_1.pkl"}
    assert not [f for f in _files(ddp) if f.endswith(".tmp")]
    for name in ("train_docs.jsonl", "adapter/tokenizer.json"):
        assert (single / name).read_bytes() == (ddp / name).read_bytes(), name
    configs = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (single, ddp)]
    for c in configs:  # peft writes target_modules from a set: its order varies between processes
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]

    # (d) stop after the step-2 checkpoint, refuse a 1-process resume, resume with 2 processes: identical
    _ok(_run(2, _args(tiny_llama_dir, stopped, "--stop-after-steps", "2"), logs["stopped"]))
    assert not (stopped / "manifest.json").exists()
    state = json.loads((stopped / "checkpoints" / "step-2" / "needles_state.json").read_text())
    assert state["step"] == 2 and state["processes"] == 2
    refused = _run(1, _args(tiny_llama_dir, stopped, "--resume"), tmp_path / "log-refused")
    assert refused.returncode == 2 and "written by 2 process(es), this run has 1" in refused.stderr
    resumed = _ok(_run(2, _args(tiny_llama_dir, stopped, "--resume"), logs["stopped"]))
    assert "resumed from" in resumed.stderr and "at step 2/4" in resumed.stderr
    w3 = _adapter(stopped)
    assert w3.keys() == w2.keys() and all(torch.equal(w2[k], w3[k]) for k in w2)  # bit for bit
    assert _untimed(stopped / "train_log.json") == _untimed(ddp / "train_log.json")
    for rank in (0, 1):  # the resumed session continued where the stopped one ended, on the same shards
        assert _log(logs["stopped"], rank) == _log(logs["ddp"], rank)
    assert _files(stopped) == _files(ddp)
