"""`needles heads` on an extended model: probes past the native window are refused, before the model
loads, for a model served with its own window (the fix names the override), and accepted with the RoPE the model
is served with: `--hf-overrides` (the training-free variant) or the finetune manifest of an extended adapter. The
tiny random Llama cut to a 512-token window; the scores of a random model mean nothing, the RoPE it ran with does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import llama_config_only, with_native_window

from harness_ext.cli import main
from harness_ext.heads.rope_window import probed_rope

NATIVE = 512
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": NATIVE}
OVERRIDES = {"rope_parameters": ROPE, "max_position_embeddings": 2 * NATIVE}


@pytest.fixture
def small(tiny_llama_dir, tmp_path) -> Path:
    return with_native_window(tiny_llama_dir, tmp_path / "small", NATIVE)


@pytest.fixture
def config_only(tmp_path) -> Path:
    """A folder holding only a 512-window Llama config.json: the checks below never load weights."""
    return llama_config_only(tmp_path / "config-only", NATIVE)


def heads(capsys, *argv: str) -> tuple[int, str]:
    code = main(["heads", *argv])
    return code, capsys.readouterr().err


KV_800 = ("--probes", "kv", "--kv-lengths", "800", "--kv-samples", "1", "--kv-depths", "0.5", "--quiet")


def test_probes_past_the_native_window_are_refused_with_the_override_to_use(config_only, tmp_path, capsys):
    small = config_only
    code, err = heads(capsys, "--model", str(small), *KV_800, "-o", str(tmp_path / "out"))
    assert code == 2 and "--kv-lengths [800] do not fit the window the model is probed with (512 tokens" in err
    fix = err.split("fix:", 1)[1]
    suggested = json.loads(fix.split("--hf-overrides '", 1)[1].split("'", 1)[0])
    assert suggested["rope_parameters"]["rope_type"] == "yarn" and suggested["max_position_embeddings"] >= 1024
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # the override must carry rope_parameters; past its own window it is refused as well
    code, err = heads(capsys, "--model", str(small), *KV_800, "--hf-overrides", '{"rope_theta": 1}', "-o", "x")
    assert code == 2 and "needs a rope_parameters object" in err
    small_yarn = json.dumps({**OVERRIDES, "max_position_embeddings": 600})
    code, err = heads(capsys, "--model", str(small), *KV_800, "--hf-overrides", small_yarn, "-o", "x")
    assert code == 2 and "(600 tokens, from --hf-overrides" in err


def test_an_extended_adapter_is_probed_with_the_rope_it_was_trained_with(config_only, tmp_path):
    small = config_only
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"context": {"hf_overrides": OVERRIDES}}))
    overrides, info = probed_rope(small, run / "adapter", None)
    assert overrides == OVERRIDES and info["window"] == 1024 and info["native_window"] == NATIVE
    assert info["source"] == "the adapter's finetune manifest"
    # an explicit override wins; a plain model is probed as it is
    assert (
        probed_rope(small, run / "adapter", json.dumps({**OVERRIDES, "max_position_embeddings": 900}))[1]["window"]
        == 900
    )
    assert probed_rope(small, None, None) == (None, {"window": NATIVE, "native_window": NATIVE,
        "source": "the model's config.json", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})  # fmt: skip


@pytest.mark.heavy
def test_detection_and_knockout_past_the_native_window_with_the_override(small, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*KV_800, "--knockout", "top:1", "--eval-lengths", "800", "--eval-samples", "1", "--eval-depths", "0.5"]
    code, err = heads(capsys, "--model", str(small), *argv, "--draws", "1", "--hf-overrides", json.dumps(OVERRIDES),
                      "-o", str(out))  # fmt: skip
    assert code == 0, err
    model = json.loads((out / "heads.json").read_text())["model"]
    assert model["rope_window"]["window"] == 1024 and model["rope_window"]["source"] == "--hf-overrides"
    assert model["config_overrides"] == {"rope_parameters": ROPE, "max_position_embeddings": 1024}
    knockout = json.loads((out / "knockout.json").read_text())
    assert knockout["eval"]["lengths"] == [800] and knockout["model"]["rope_window"]["window"] == 1024
