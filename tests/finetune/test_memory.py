"""The CPU training-memory plan of `needles finetune`: its estimate against a measured training step, the decision
(checkpointing on where a micro-batch would not fit without it; a refusal with the fix where it would not fit with
it), and both as the real CLI shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TINY_LAYERS, TINY_LORA, finetune_argv

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune import memory

# One LoRA step of a random tiny Llama in a fresh interpreter (the allocator keeps what a step freed, so each shape
# needs its own process); prints the peak resident memory the step added, in bytes.
STEP = """
import re, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
layers, rows, width, on = json.loads(sys.argv[1])
conf = LlamaConfig(vocab_size=49152, num_key_value_heads=2, max_position_embeddings=32768, **layers)
torch.manual_seed(0)
model = LlamaForCausalLM._from_config(conf, attn_implementation="sdpa")
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
model = get_peft_model(model, lora)
if on:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
ids = torch.randint(0, 49000, (rows, width))
mask = torch.ones(rows, width, dtype=torch.long)
mask[0, : width // 10] = 0  # left padding, as the recipe's collate writes it
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
               logits_to_keep=16, use_cache=False).logits
logits.float().logsumexp(-1).mean().backward()
print(status("VmHWM") - base)
"""


@pytest.mark.heavy  # trains a step (in a subprocess, ~10 s)
@pytest.mark.parametrize("rows,width,on", [(4, 4096, False), (4, 4096, True)])
def test_the_estimate_is_within_a_third_of_a_measured_step(rows, width, on):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure one step's peak")
    args = json.dumps([TINY_LAYERS, rows, width, on])
    out = subprocess.run([sys.executable, "-c", "import json\n" + STEP, args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = int(out.stdout.strip().splitlines()[-1])
    conf = type("Conf", (), {**TINY_LAYERS, "vocab_size": 49152})
    estimate = memory.activation_bytes(conf, rows, width, rows * 16, on)
    assert 0.67 * measured < estimate < 1.5 * measured, (estimate, measured)


def _smollm2_config():
    # SmolLM2-135M-Instruct's shape (30 layers, 576 wide, 1,536 intermediate, 9 heads)
    keys = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    return type("Conf", (), {**keys, "vocab_size": 49152})


# the real synth_mdqa cell's longest micro-batch at the defaults: 4 rows padded to 1,982 tokens
REAL_CELL = {(4, 1982, 4 * 9), (4, 1200, 4 * 9)}


def test_checkpointing_turns_on_where_the_largest_batch_would_not_fit(monkeypatch):
    monkeypatch.setenv("NEEDLES_MEMORY_LIMIT_MB", str(23 * 1024))  # the 23 GB machine it was killed on
    plan = memory.plan_memory(_smollm2_config(), REAL_CELL, None, False)
    assert plan.checkpointing and (plan.rows, plan.width) == (4, 1982)
    assert plan.with_mib < 0.7 * 23 * 1024 < plan.without_mib
    assert "would not fit" in plan.reason
    monkeypatch.setenv("NEEDLES_MEMORY_LIMIT_MB", str(64 * 1024))
    roomy = memory.plan_memory(_smollm2_config(), REAL_CELL, None, False)
    assert not roomy.checkpointing and roomy.without_mib == plan.without_mib
    assert memory.plan_memory(_smollm2_config(), REAL_CELL, None, True).checkpointing  # the length rule still holds
    assert not memory.plan_memory(_smollm2_config(), REAL_CELL, False, False).checkpointing  # as the user set it


def test_a_batch_that_fits_with_checkpointing_only_is_refused_when_it_is_turned_off(monkeypatch):
    monkeypatch.setenv("NEEDLES_MEMORY_LIMIT_MB", str(23 * 1024))
    with pytest.raises(NeedlesError) as err:
        memory.plan_memory(_smollm2_config(), REAL_CELL, False, False)
    assert "4 x 1982 tokens" in str(err.value) and "--gradient-checkpointing" in err.value.fix
    monkeypatch.setenv("NEEDLES_MEMORY_LIMIT_MB", "4000")  # fits in neither way: no checkpointing hint
    with pytest.raises(NeedlesError) as err:
        memory.plan_memory(_smollm2_config(), REAL_CELL, None, False)
    assert "with gradient checkpointing" in str(err.value) and "--batch-size 1" in err.value.fix
    assert "--gradient-checkpointing (" not in err.value.fix
    monkeypatch.setenv("NEEDLES_MEMORY_CHECK", "0")
    assert memory.plan_memory(_smollm2_config(), REAL_CELL, None, False).checkpointing


def test_packed_and_padded_micro_batches_are_shaped_as_collate_shapes_them():
    from harness_ext.finetune.data import Example

    examples = [Example(list(range(n)), n - 3) for n in (10, 20, 30)]
    assert memory.micro_batch_shapes(examples, [[0, 1], [2]], "grouped") == {(2, 20, 2 * 4), (1, 30, 4)}
    assert memory.micro_batch_shapes(examples, [[0, 1, 2]], "packed") == {(1, 60, 9)}


def _cli(argv: list[str], limit_mb: float | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "NEEDLES_MEMORY_LIMIT_MB"}
    if limit_mb is not None:
        env["NEEDLES_MEMORY_LIMIT_MB"] = str(limit_mb)
    return subprocess.run(
        [sys.executable, "-m", "harness_ext.cli", *argv], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.heavy  # three tiny finetunes
def test_the_cli_turns_checkpointing_on_for_memory_and_refuses_a_run_that_cannot_fit(tiny_llama_dir, tmp_path):
    """Two KV rows of ~4,100 tokens on the tiny model (the length rule set aside): the mask and activations differ
    enough with and without checkpointing that a limit between the two estimates turns it on; a limit below both
    is refused (exit 2) before the first step."""
    conf = type("Conf", (), {**TINY_LAYERS, "vocab_size": 49152})
    widths = (4096, 4400)  # the rows' 4,096 tokens of document plus the chat template and the question
    without = min(memory.activation_bytes(conf, 2, w, 64, False) for w in widths)
    with_ = max(memory.activation_bytes(conf, 2, w, 64, True) for w in widths)
    assert with_ < without
    between = (with_ + without) / 2 / memory.USABLE_SHARE / memory.MIB
    extra = (*TINY_LORA, "--epochs", "1", "--gradient-checkpointing-above", "100000")  # the length rule off
    tight = _cli(finetune_argv(tiny_llama_dir, tmp_path / "tight", *extra, num_samples=2, length=4096), between)
    assert tight.returncode == 0, tight.stderr[-3000:]
    assert "gradient checkpointing on: the largest micro-batch would not fit" in tight.stderr
    training = json.loads((tmp_path / "tight" / "manifest.json").read_text())["training"]
    assert training["gradient_checkpointing"] is True
    plan = training["memory"]
    assert plan["available_from"] == "NEEDLES_MEMORY_LIMIT_MB" and plan["largest_micro_batch"]["rows"] == 2
    assert 4096 < plan["largest_micro_batch"]["width"] < 4400
    peaks = plan["estimated_peak_mib"]
    assert peaks["with_checkpointing"] < memory.USABLE_SHARE * between < peaks["without_checkpointing"]
    small = _cli(finetune_argv(tiny_llama_dir, tmp_path / "small", *extra, num_samples=2, length=4096), 50)
    assert small.returncode == 2 and "Traceback" not in small.stderr
    assert "the kernel would kill the run" in small.stderr and "--batch-size 1" in small.stderr
    assert not (tmp_path / "small" / "manifest.json").exists()


# The real finetune CLI with the model's forward failing as torch fails on a GPU that runs out of memory (the error
# torch raises there, injected: this machine has no GPU) at a chosen call; any other error must stay as it is.
FAILING = """
import sys, torch
from transformers.models.llama import modeling_llama
from harness_ext.finetune.__main__ import main
fail_at, error = int(sys.argv[1]), sys.argv[2]
calls, forward = [0], modeling_llama.LlamaForCausalLM.forward
def failing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == fail_at:
        if error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total)")
        raise RuntimeError("an unrelated failure")
    return forward(self, *args, **kwargs)
modeling_llama.LlamaForCausalLM.forward = failing
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.heavy  # two tiny finetunes of a step or two
def test_out_of_memory_in_a_step_is_a_clear_error_and_other_errors_are_not_hidden(tiny_llama_dir, tmp_path):
    out = tmp_path / "oom"
    argv = finetune_argv(tiny_llama_dir, out, *TINY_LORA, "--save-every", "1", num_samples=8)[1:]
    proc = subprocess.run([sys.executable, "-c", FAILING, "2", "oom", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr[proc.stderr.index("needles: error:") :]
    assert "out of memory on cpu at step 2, micro-batch 2 x " in error and "Tried to allocate 20.00 GiB" in error
    assert "--gradient-checkpointing" in error and "--batch-size 1 --grad-accum 4" in error and "--resume" in error
    # the step before it was kept, for --resume; the run did not write a finished run's manifest
    assert (out / "checkpoints" / "step-1" / "needles_state.json").is_file()
    assert not (out / "manifest.json").exists()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            FAILING,
            "1",
            "other",
            *finetune_argv(tiny_llama_dir, tmp_path / "other", *TINY_LORA)[1:],
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 1 and "RuntimeError: an unrelated failure" in other.stderr
    assert "out of memory" not in other.stderr
