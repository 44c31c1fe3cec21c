"""SmolLM2's context-extension check in CI: one KV prompt of ~8.8K tokens, past SmolLM2-135M-Instruct's 8,192-token
native window, scored through the real ``lm_eval run --model vllm`` with the training-free YaRN override (``hf_overrides`` +
``max_model_len``, the command ``needles finetune --context-length`` prints for the untrained model).

Kept to one document just past the window and 8 generated tokens: the cost is one engine start plus the prefill, whose
attention grows with the square of the prompt. It asserts that the prompt really is past the window (re-tokenised from
the sample log, not taken from the task's own count), that it was generated for, and that the results record the
override vLLM was started with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness_ext.core import rope as ropelib
from harness_ext.plugin.runner import eval_env, vllm_eval_command

LENGTH = 8_800  # prompt tokens: past the 8,192-token native window, inside YaRN x2's 16,384
MAX_MODEL_LEN = 9_216  # vLLM's window for the run (prompt + 8 generated tokens, with room for the chat template)


@pytest.mark.heavy
@pytest.mark.vllm
def test_smollm2_scores_a_prompt_past_its_window_with_the_training_free_yarn_override(
    smollm2_dir, lm_eval_run, monkeypatch
):
    config = ropelib.read_config_json(smollm2_dir)
    assert ropelib.rope_window(config) == 8192  # the prompt below is past the native window
    overrides = ropelib.suggested_overrides(config, MAX_MODEL_LEN)  # YaRN, factor ceil(9216 / 8192) = 2
    assert overrides["rope_parameters"]["rope_type"] == "yarn" and overrides["max_position_embeddings"] == 16384
    meta = {"lengths": [LENGTH], "depths": [0.5], "num_samples": 1}
    argv = vllm_eval_command(str(smollm2_dir), ["kv_retrieval_simple"], meta, MAX_MODEL_LEN, hf_overrides=overrides)
    argv += ["--gen_kwargs", "max_gen_toks=8"]
    for key, value in eval_env(smollm2_dir, MAX_MODEL_LEN).items():  # none for SmolLM2: its tokenizer sets no cap
        monkeypatch.setenv(key, value)
    res = lm_eval_run(argv[2:], "smollm2_yarn_past_window")

    # the run was served with the override, past the native window
    served = res["config"]["model_args"]
    assert served["hf_overrides"] == overrides and int(served["max_model_len"]) == MAX_MODEL_LEN
    log = next(p / "lm_eval.log" for p in Path(res["_path"]).parents if (p / "lm_eval.log").is_file()).read_text()
    assert f"max_seq_len={MAX_MODEL_LEN}" in log

    # one prompt past the native window, counted again from the logged prompt with the model's tokenizer
    from transformers import AutoTokenizer

    samples = Path(res["_dir"]).glob("samples_kv_retrieval_simple_*.jsonl")
    (row,) = [json.loads(line) for line in next(samples).read_text().splitlines()]
    prompt = row["arguments"]["gen_args_0"]["arg_0"]
    n = len(AutoTokenizer.from_pretrained(smollm2_dir)(prompt, add_special_tokens=False)["input_ids"])
    assert 8_192 < n <= MAX_MODEL_LEN - 8, n
    assert abs(n - row["doc"]["n_tokens"]) <= 64  # the task's own count agrees
    assert isinstance(row["resps"][0][0], str) and row["resps"][0][0].strip()  # generated for
    assert res["results"]["kv_retrieval_simple"]["value_acc,none"] in (0.0, 1.0)
    print(f"prompt tokens {n}; reply {row['resps'][0][0]!r}")
