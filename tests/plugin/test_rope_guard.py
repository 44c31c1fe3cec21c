"""The plugin's RoPE guard: an adapter that `needles finetune` trained with an extended RoPE is refused
when served without it (its run's manifest says which), and every fix shows ``hf_overrides`` in the form lm_eval
0.4.13 reads: its own ``--model_args`` value after the comma-separated one. Config files only: no engine starts
(the guard runs before the wrapped ``__init__``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from tiny_models import llama_config_only

from harness_ext.core.errors import NeedlesError
from harness_ext.plugin.rope_guard import patch_vllm_init, refuse_past_window, served_config

NATIVE = 512
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": NATIVE}
OVERRIDES = {"rope_parameters": ROPE, "max_position_embeddings": 2 * NATIVE}


@pytest.fixture
def model(tmp_path) -> Path:
    return llama_config_only(tmp_path / "base", NATIVE)


@pytest.fixture
def extended_adapter(tmp_path) -> Path:
    """OUT/adapter beside the OUT/manifest.json of a run trained with YaRN 512 -> 1024."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    manifest = {"kind": "needles-finetune", "context": {"hf_overrides": OVERRIDES, "rope_parameters": ROPE}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run / "adapter"


class Engine:
    """Stands in for lm_eval's VLLM class: records that its __init__ ran (the engine would start there)."""

    def __init__(self, pretrained=None, **kwargs):
        self.started = kwargs


patch_vllm_init(Engine)


def model_args_in(fix: str) -> dict:
    """The ``--model_args`` values a fix line shows, parsed by lm_eval run's own action."""
    from lm_eval._cli.utils import MergeDictAction

    found = re.search(r"--model_args (\S+) '(hf_overrides=[^']*)'", fix)
    assert found, fix
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction)
    return parser.parse_args(["--model_args", found.group(1), found.group(2)]).model_args


def test_an_extended_adapter_served_without_its_rope_is_refused_before_the_engine(model, extended_adapter):
    with pytest.raises(NeedlesError) as exc:  # inside the native window too: positions are encoded another way
        Engine(pretrained=str(model), max_model_len=NATIVE, lora_local_path=str(extended_adapter))
    assert f"the adapter {extended_adapter} was trained with RoPE" in exc.value.problem
    assert "'rope_type': 'yarn'" in exc.value.problem and "'rope_type': 'default'" in exc.value.problem
    assert str(extended_adapter.parent / "manifest.json") in exc.value.problem
    parsed = model_args_in(exc.value.fix)
    assert parsed["hf_overrides"] == OVERRIDES and parsed["lora_local_path"] == str(extended_adapter)
    assert parsed["pretrained"] == str(model) and parsed["max_model_len"] == NATIVE
    # served with the override it was trained with (a dict, or the JSON text the Python API may pass): accepted
    assert Engine(pretrained=str(model), max_model_len=1024, lora_local_path=str(extended_adapter),
                  hf_overrides=OVERRIDES).started  # fmt: skip
    assert Engine(pretrained=str(model), max_model_len=1024, lora_local_path=str(extended_adapter),
                  hf_overrides=json.dumps(OVERRIDES)).started  # fmt: skip
    # another RoPE than the trained one is refused as well
    other = {"rope_parameters": {**ROPE, "factor": 4.0}, "max_position_embeddings": 4 * NATIVE}
    with pytest.raises(NeedlesError, match="was trained with RoPE"):
        Engine(pretrained=str(model), max_model_len=1024, lora_local_path=str(extended_adapter), hf_overrides=other)


def test_adapters_without_an_extension_are_served_as_they_are(model, tmp_path):
    plain = tmp_path / "plain" / "adapter"  # no manifest beside it
    plain.mkdir(parents=True)
    assert Engine(pretrained=str(model), max_model_len=NATIVE, lora_local_path=str(plain)).started
    run = tmp_path / "inside"  # a run that did not change the RoPE
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"kind": "needles-finetune", "context": None}))
    assert Engine(pretrained=str(model), max_model_len=NATIVE, lora_local_path=str(run / "adapter")).started


def test_the_past_window_fix_shows_the_override_as_its_own_model_args_value(model):
    with pytest.raises(NeedlesError) as exc:
        refuse_past_window(served_config(model, None), 1024, model)
    parsed = model_args_in(exc.value.fix)
    assert parsed["pretrained"] == str(model) and parsed["max_model_len"] == 1024
    assert parsed["hf_overrides"] == {"rope_parameters": ROPE, "max_position_embeddings": 1024}
    assert "its own --model_args value after the comma-separated one" in exc.value.fix
