"""The same RoPE on every path: a RoPE trained one way and served another is refused (dynamic NTK),
theta has a documented default, a per-layer-type RoPE (Gemma 3) keeps its layer types when extended, and the
printed scoring commands test the model at the lengths it was extended to. Config files and the tiny random
Llama only: nothing trains or serves here."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from tiny_models import TINY_LAYERS, with_native_window
from transformers import AutoConfig, Gemma3TextConfig

from harness_ext.cli import main as cli_main
from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import FinetuneConfig
from harness_ext.finetune.context import plan_context
from harness_ext.finetune.outputs import length_ladder, record_outputs

NATIVE = 512


@pytest.fixture(scope="module")
def small(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama (head_dim 32) with a 512-token native window."""
    return with_native_window(tiny_llama_dir, tmp_path_factory.mktemp("rope-paths") / "small", NATIVE)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    """A config-only Gemma 3 text model: sliding and full attention layers, one RoPE dict per layer type."""
    out = tmp_path_factory.mktemp("gemma3")
    Gemma3TextConfig(
        vocab_size=256,
        **TINY_LAYERS,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
    ).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------- dynamic NTK
def test_dynamic_is_refused_for_training_with_the_reason_and_the_fix(small, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["finetune", "--model", str(small), "-o", str(out), "--context-length", "1024", "--rope-type",
                     "dynamic"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "context.rope.type dynamic cannot be trained" in err and "Traceback" not in err
    assert "vLLM serves one base fixed for the maximum length" in err
    fix = err.split("fix:", 1)[1]
    assert "--rope-type yarn" in fix and "training-free" in fix
    assert not out.exists()
    with pytest.raises(NeedlesError, match="dynamic cannot be trained"):
        plan_context({"length": 1024, "rope": {"type": "dynamic", "factor": 2}}, str(small))


# ------------------------------------------------------------------------------------- theta's default
def test_theta_defaults_to_the_ntk_aware_base_and_says_so(small):
    plan = plan_context({"length": 2048, "rope": {"type": "theta"}}, str(small))
    # theta' = theta x s ** (d / (d - 2)): the tiny Llama's 10000, s = 2048 / 512 = 4, d = head_dim 32
    assert plan.rope["rope_theta"] == pytest.approx(10000.0 * 4 ** (32 / 30))
    assert plan.rope["rope_type"] == "default" and plan.window == 2048
    assert plan.defaults["rope_theta"] == "NTK-aware: 10000 x (2048/512) ** (32/30)"
    assert plan.to_json()["defaults"] == plan.defaults
    line = plan.describe()
    assert f"rope_theta {plan.rope['rope_theta']:g} (NTK-aware: 10000 x (2048/512) ** (32/30))" in line
    assert "window 512 -> 2048" in line
    # a given theta is used as given, and not reported as a default
    given = plan_context({"length": 2048, "rope": {"type": "theta", "theta": 8.0e6}}, str(small))
    assert given.rope["rope_theta"] == 8.0e6 and "rope_theta" not in given.defaults
    # the other defaults are printed with their rule too
    yarn = plan_context({"length": 1300, "rope": {"type": "yarn"}}, str(small)).describe()
    assert "factor 3 (ceil(1300 / 512))" in yarn and "rope_theta 10000 (the model's)" in yarn


def test_theta_without_a_head_size_in_the_config_names_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512, "rope_theta": 1e4}))
    with pytest.raises(NeedlesError, match="no default here") as exc:
        plan_context({"length": 2048, "rope": {"type": "theta"}}, str(tmp_path))
    assert "theta: 8.0e6" in exc.value.fix


# ------------------------------------------------------------------------------------- per-layer-type RoPE
def test_a_per_layer_type_rope_is_extended_on_full_attention_and_keeps_the_other_types(gemma3):
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    base = ropelib.read_config_json(gemma3)["rope_parameters"]
    assert set(base) == {"full_attention", "sliding_attention"}
    plan = plan_context({"length": 4096, "rope": {"type": "yarn"}}, str(gemma3))
    assert plan.rope["rope_theta"] == base["full_attention"]["rope_theta"]  # the global layers' 1e6
    written = plan.hf_overrides()["rope_parameters"]
    assert written["sliding_attention"] == base["sliding_attention"]
    assert written["full_attention"] == plan.rope and plan.rope["factor"] == 4.0
    assert plan.config_kwargs()["rope_parameters"] == written and plan.to_json()["rope_parameters"] == written
    assert "on full_attention layers" in plan.describe()
    # transformers builds each layer type's RoPE from it: sliding layers as pretrained, full attention scaled
    conf = AutoConfig.from_pretrained(gemma3, **plan.config_kwargs())
    rotary = Gemma3RotaryEmbedding(conf)
    plain = Gemma3RotaryEmbedding(AutoConfig.from_pretrained(gemma3))
    assert torch.equal(rotary.sliding_attention_inv_freq, plain.sliding_attention_inv_freq)
    assert not torch.equal(rotary.full_attention_inv_freq, plain.full_attention_inv_freq)
    # the guard reads the full-attention entry of the served config, and suggests overrides of the same shape
    assert ropelib.rope_window(ropelib.with_overrides(ropelib.read_config_json(gemma3), plan.hf_overrides())) == 4096
    suggested = ropelib.suggested_overrides(ropelib.read_config_json(gemma3), 2048)["rope_parameters"]
    assert suggested["sliding_attention"] == base["sliding_attention"] and suggested["full_attention"]["factor"] == 2


def test_theta_and_linear_on_gemma3_change_only_full_attention_and_serve_the_window(gemma3):
    theta = plan_context({"length": 2048, "rope": {"type": "theta", "theta": 4.0e6}}, str(gemma3))
    layers = theta.hf_overrides()["rope_parameters"]
    assert layers["full_attention"]["rope_theta"] == 4.0e6 and layers["sliding_attention"]["rope_theta"] == 10000.0
    # vLLM takes Gemma 3's max_position_embeddings as scaled already: a linear plan writes the window itself
    linear = plan_context({"length": 2048, "rope": {"type": "linear"}}, str(gemma3))
    assert linear.max_position_embeddings == linear.window == 2048


# ------------------------------------------------------------------------------------- the printed commands
def test_the_ladder_spans_the_native_window_and_past_it_up_to_what_the_new_window_holds():
    assert length_ladder(8192, 16384, 128) == [4096, 8064, 12288, 16256]
    assert length_ladder(8192, 32768, 128) == [4096, 8064, 12288, 16384, 32640]
    assert length_ladder(512, 1024, 128) == [256, 384, 768, 896]


def _model_args(line: str) -> dict:
    """--model_args of a printed lm_eval line, parsed by lm_eval's own action."""
    from lm_eval._cli.utils import MergeDictAction

    argv = shlex.split(line.split("# ", 1)[-1])
    argv = argv[next(i for i, a in enumerate(argv) if a == "lm_eval") :]
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction)  # lm_eval run's own action
    parser.add_argument("--metadata", type=json.loads)
    parser.add_argument("--tasks")
    parser.add_argument("--model")
    known = parser.parse_known_args(argv)[0]
    return {**known.model_args, "_metadata": known.metadata, "_tasks": known.tasks}


def test_the_printed_commands_score_the_extension_at_the_lengths_it_reaches(tmp_path):
    model = tmp_path / "smollm2-like"  # SmolLM2's window and base frequency, config only
    model.mkdir()
    conf = {"model_type": "llama", "max_position_embeddings": 8192, "hidden_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}  # fmt: skip
    (model / "config.json").write_text(json.dumps(conf))
    plan = plan_context({"length": 16384, "rope": {"type": "yarn"}}, str(model))
    out = tmp_path / "run"
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    cfg = FinetuneConfig(output_dir=str(out))
    manifest: dict = {}
    merged = out / "merged"
    record_outputs(manifest, cfg, str(model), ["kv_retrieval_simple"], adapter, merged, window=plan.window,
                   seq_len=4200, eval_max_tokens=3100, on_gpu=False, context=plan)  # fmt: skip
    ladder = [4096, 8064, 12288, 16256]  # inside the 8K window, at its edge, and past it up to 16K
    assert manifest["eval_lengths"] == ladder and manifest["eval_max_model_len"] == 16384
    script = (out / "eval_command.sh").read_text().splitlines()
    adapter_args = _model_args(script[1])
    assert adapter_args["_metadata"] == {"lengths": ladder} and adapter_args["max_model_len"] == 16384
    assert adapter_args["hf_overrides"] == plan.hf_overrides() and adapter_args["lora_local_path"] == str(adapter)
    merged_args = _model_args(next(x for x in script if "pretrained=" + str(merged) in x))
    assert merged_args["_metadata"]["lengths"] == ladder and "hf_overrides" not in merged_args
    free_args = _model_args(next(x for x in script if "eval_training_free" in x))
    assert free_args["_metadata"]["lengths"] == ladder and free_args["hf_overrides"] == plan.hf_overrides()
    assert list(manifest["eval_commands_long"]) == ["needles_passkey", "niah"]
    for task, key in (("needles_passkey", "passkey_lengths"), ("niah", "niah_lengths")):
        line = _model_args(manifest["eval_commands_long"][task])
        assert line["_tasks"] == task and line["_metadata"] == {key: ladder}
        assert line["hf_overrides"] == plan.hf_overrides() and line["max_model_len"] == 16384
        assert line["lora_local_path"] == str(adapter)
        assert any(x.startswith(f"# {task} at the same lengths") for x in script)


def test_lengths_the_user_set_are_kept_and_a_run_inside_the_window_prints_no_ladder(tmp_path, small):
    out = tmp_path / "run"
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    plan = plan_context({"length": 1024, "rope": {"type": "yarn"}}, str(small))
    cfg = FinetuneConfig(output_dir=str(out), eval_metadata={"lengths": [800]})
    manifest: dict = {}
    record_outputs(manifest, cfg, str(small), ["kv_retrieval_simple"], adapter, None, window=plan.window,
                   seq_len=700, eval_max_tokens=800, on_gpu=False, context=plan)  # fmt: skip
    assert _model_args(manifest["eval_command"])["_metadata"] == {"lengths": [800]}
    assert _model_args(manifest["eval_commands_long"]["niah"])["_metadata"] == {"niah_lengths": [256, 384, 768, 896]}
    inside: dict = {}
    cfg = FinetuneConfig(output_dir=str(out))
    record_outputs(inside, cfg, str(small), ["kv_retrieval_simple"], adapter, None, window=NATIVE,
                   seq_len=300, eval_max_tokens=300, on_gpu=False, context=None)  # fmt: skip
    assert "eval_lengths" not in inside and "eval_commands_long" not in inside
    assert "--metadata" not in inside["eval_argv"]
