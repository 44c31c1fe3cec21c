"""Context extension, heavy part, on the tiny random Llama cut to a 512-token native window: LoRA
training past the window with YaRN (memory and tokens/s per length recorded, the merged folder's config carrying
the RoPE), then one real vLLM (CPU) launch serving the adapter with the printed command's ``hf_overrides`` on KV
prompts longer than the native window, and the same prompts on the un-extended model refused by the guard before
the engine starts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_LORA, with_native_window
from tiny_models import finetune_argv as tiny_finetune_argv

from harness_ext.cli import main as cli_main
from harness_ext.plugin.runner import lm_eval_env

NATIVE, TARGET = 512, 1024
TRAIN_LENGTH = 700  # prompt tokens: every training example is longer than the native window
EVAL_META = {"lengths": [800], "depths": [0.5], "num_samples": 2}


@pytest.fixture(scope="module")
def small(tiny_llama_dir, tmp_path_factory) -> Path:
    return with_native_window(tiny_llama_dir, tmp_path_factory.mktemp("ctx-serving") / "small", NATIVE)


def finetune_argv(model: Path, out: Path, *extra: str) -> list[str]:
    lora = (*TINY_LORA, "--max-steps", "2", "--lora-alpha", "16", *extra)
    return tiny_finetune_argv(model, out, *lora, num_samples=4, length=TRAIN_LENGTH, eval_metadata=EVAL_META)


@pytest.fixture(scope="module")
def extended(small, tmp_path_factory) -> dict:
    """`needles finetune` with a context section: YaRN 512 -> 1024, gradient checkpointing from 512 tokens."""
    out = tmp_path_factory.mktemp("ctx-run") / "run"
    extra = ("--context-length", str(TARGET), "--rope-type", "yarn", "--gradient-checkpointing-above", "512")
    assert cli_main(finetune_argv(small, out, *extra, "--merge")) == 0
    return {"out": out, "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.mark.heavy
def test_training_past_the_native_window_records_memory_and_writes_the_rope(small, extended, tmp_path, capsys):
    m, out = extended["manifest"], extended["out"]
    ctx = m["context"]
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": NATIVE}
    assert ctx["rope_parameters"] == rope and (ctx["native_window"], ctx["window"]) == (NATIVE, TARGET)
    assert ctx["hf_overrides"] == {"rope_parameters": rope, "max_position_embeddings": TARGET}
    assert m["data"]["tokens"]["min_len"] > NATIVE  # every example is past the native window
    training = m["training"]
    assert training["gradient_checkpointing"] is True and training["steps"] == 2
    (bucket, row), *_ = training["by_length"].items()
    assert bucket == "up_to_1024" and row["steps"] == 2 and row["longest_sequence"] > NATIVE
    assert row["memory"] == "rss_peak_per_step" and row["peak_memory_mb"] > 100 and row["tokens_per_second"] > 0

    # the merged folder carries the RoPE and window in the form the installed transformers writes
    merged_conf = json.loads((out / "merged" / "config.json").read_text())
    assert merged_conf["rope_parameters"] == rope and merged_conf["max_position_embeddings"] == TARGET
    # ... and it is the model that was trained: its logits past the native window are base+adapter's with the RoPE,
    # and differ from base+adapter served without it
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.randint(10, 1000, (1, 900), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        ext = AutoConfig.from_pretrained(small, rope_parameters=rope, max_position_embeddings=TARGET)
        with_rope = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small, config=ext), out / "adapter")
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small), out / "adapter")
        gap_rope = (merged - with_rope.eval()(ids).logits).abs().max().item()
        gap_plain = (merged - plain.eval()(ids).logits).abs().max().item()
    # a random tiny model's logits are near-uniform, so RoPE moves them little; merging only adds round-off
    assert gap_rope < 1e-5 and gap_plain > 1e-4 and gap_plain > 20 * gap_rope, (gap_rope, gap_plain)

    # the adapter's command passes the override; the merged one needs none; the training-free one has no adapter
    assert "hf_overrides=" in m["eval_command"] and "lora_local_path=" in m["eval_command"]
    assert "hf_overrides" not in m["eval_command_merged"] and "max_model_len=1024" in m["eval_command_merged"]
    free = m["eval_command_training_free"]
    assert "hf_overrides=" in free and "lora_local_path" not in free and f"pretrained={small}," in free
    # the adapter's and the training-free commands, then the passkey and NIAH lines (the adapter at the ladder)
    assert (out / "eval_command.sh").read_text().count("hf_overrides=") == 4
    assert m["eval_lengths"] == [256, 384, 768, 896] and list(m["eval_commands_long"]) == ["needles_passkey", "niah"]

    # without the context section the same data is refused before training, with the extension as the fix
    code = cli_main(finetune_argv(small, tmp_path / "plain"))
    err = capsys.readouterr().err
    assert code == 2 and "the model holds at most 512" in err and "--context-length" in err


@pytest.mark.vllm
def test_vllm_serves_the_printed_command_past_the_native_window_and_the_guard_refuses_the_plain_model(
    extended, small, lm_eval_run, tmp_path, monkeypatch
):
    m = extended["manifest"]
    argv = m["eval_argv"]  # exactly what needles finetune printed (its eval_command is this argv, shell-quoted)
    assert shlex.join(argv) == m["eval_command"] and m["eval_env"] == {}
    # no VLLM_ALLOW_LONG_MAX_MODEL_LEN: vLLM accepts max_model_len=1024 only because the override reached its config
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    res = lm_eval_run(argv[2:], "extended")
    served = res["config"]["model_args"]
    assert served["hf_overrides"] == m["context"]["hf_overrides"] and served["max_model_len"] == TARGET
    # the adapter itself is served through vLLM's LoRA path (the SmolLM2 loop test scores a merged model)
    assert served["lora_local_path"] == m["outputs"]["adapter"]
    assert int(served["max_lora_rank"]) >= m["outputs"]["lora_rank"]
    log = next(p / "lm_eval.log" for p in Path(res["_path"]).parents if (p / "lm_eval.log").is_file()).read_text()
    assert "Initializing a V1 LLM engine" in log and "max_seq_len=1024" in log
    samples_file = next(Path(res["_path"]).parent.glob("samples_kv_retrieval_simple_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2
    for s in samples:
        assert s["doc"]["n_tokens"] > NATIVE  # prompts past the native window ...
        assert isinstance(s["resps"][0][0], str) and s["resps"][0][0]  # ... were generated for

    # the same prompts on the un-extended model: refused by our guard before the engine starts (the adapter's
    # manifest says which RoPE it was trained with, so that is the refusal the user reads)
    plain = [a for a in argv[2:] if not a.startswith("hf_overrides=")]
    i = plain.index("--output_path")
    plain[i + 1] = str(tmp_path / "plain")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", *plain],
        env=lm_eval_env(dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"needles: error: the adapter {m['outputs']['adapter']} was trained with RoPE" in proc.stderr
    assert "hf_overrides=" in proc.stderr.split("fix:", 1)[1] and "Traceback" not in proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr  # no engine was started
    assert not list((tmp_path / "plain").rglob("results_*.json"))
