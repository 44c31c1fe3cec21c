"""The patching identities on the real SmolLM2-135M-Instruct (30 layers x 9 heads, head size 64, GQA
with 3 key-value heads): the target is the base model, the source the base plus an attention-only LoRA adapter
(peft, q/k/v/o, random nonzero B: the paper finetunes attention only). Patching the `result` of every head
reproduces the source's logits, no head reproduces the target exactly, one head moves the residual stream right
after its layer's attention by exactly that head's source-minus-target output (both sites)."""

from __future__ import annotations

import pytest
import torch
from test_heads_patching import _logits, one_head_patch

from harness_ext.heads.model import load_model
from harness_ext.heads.patching import patched_logits

pytestmark = pytest.mark.heavy  # loads SmolLM2 twice

PROMPT = "Document [1] The harbour wall was built in 1821. Question: when was the harbour wall built? Answer:"


@pytest.fixture(scope="module")
def models(smollm2_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    adapter = tmp_path_factory.mktemp("smollm2-attn-lora") / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)
    target, source = load_model(smollm2_dir), load_model(smollm2_dir, adapter)
    ids = torch.tensor([target.tokenizer(PROMPT)["input_ids"]])
    return target, source, ids


def test_every_head_result_reproduces_the_adapted_source_and_no_head_the_target(models):
    target, source, ids = models
    cfg = target.model.config
    every = [(la, h) for la in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)]
    src, tgt = _logits(source, ids), _logits(target, ids)
    assert (src - tgt).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(patched_logits(target, source, ids, every, "result"), src, atol=1e-3, rtol=1e-3)
    assert torch.equal(patched_logits(target, source, ids, [], "result"), tgt)


@pytest.mark.parametrize("site", ["result", "z"])
def test_one_head_moves_the_residual_by_exactly_its_output_difference(models, site):
    target, source, ids = models
    layer = 17
    base_resid, resid, expected = one_head_patch(target, source, ids, site, layer, head=4)
    # float32 rounding of the residual itself, per position: SmolLM2's first position carries values above 20,000
    atol = 8 * torch.finfo(torch.float32).eps * base_resid[layer].abs().amax(dim=-1, keepdim=True)
    assert ((resid[layer] - base_resid[layer] - expected).abs() <= atol.clamp(min=1e-5) + 1e-3 * expected.abs()).all()
