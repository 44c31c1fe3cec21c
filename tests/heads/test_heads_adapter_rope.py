"""An adapter is never probed on a RoPE other than the one it was trained with, in `needles heads` and
`needles heads patch`: an `--hf-overrides` that contradicts the adapter's finetune manifest, a `--model` whose
RoPE differs from the base the adapter names, and an adapter without a manifest past the model's window are
refused before any weights load; inside the window an adapter without a manifest is probed with the model's RoPE
and says so. Config files only (the tiny Llama's tokenizer where the patch command checks it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.heads import scorefile
from harness_ext.heads.rope_window import NO_MANIFEST, probed_rope

NATIVE = 512
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": NATIVE}
OVERRIDES = {"rope_parameters": ROPE, "max_position_embeddings": 2 * NATIVE}
KV_800 = ("--probes", "kv", "--kv-lengths", "800", "--kv-samples", "1", "--kv-depths", "0.5", "--quiet")


def config_folder(path: Path, **changes) -> Path:
    path.mkdir(parents=True)
    conf = {"model_type": "llama", "max_position_embeddings": NATIVE, "rope_parameters": {"rope_theta": 10000.0,
            "rope_type": "default"}, **changes}  # fmt: skip
    (path / "config.json").write_text(json.dumps(conf))
    return path


def adapter_folder(run: Path, base: Path | str | None = None, manifest: dict | None = None) -> Path:
    (run / "adapter").mkdir(parents=True)
    conf = {"r": 4, "peft_type": "LORA", **({"base_model_name_or_path": str(base)} if base else {})}
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    if manifest is not None:
        (run / "manifest.json").write_text(json.dumps(manifest))
    return run / "adapter"


def heads(capsys, *argv: str) -> tuple[int, str]:
    code = main(["heads", *argv])
    return code, capsys.readouterr().err


def test_an_adapter_without_a_manifest_past_the_window_is_refused_with_no_guessed_rope(tmp_path, capsys):
    model = config_folder(tmp_path / "base")
    adapter = adapter_folder(tmp_path / "elsewhere", base=model)
    code, err = heads(capsys, "--model", str(model), "--adapter", str(adapter), *KV_800, "-o", str(tmp_path / "o"))
    assert code == 2 and "do not fit the window the model is probed with (512 tokens" in err
    assert "has no needles finetune manifest beside it" in err  # said before the refusal
    fix = err.split("fix:", 1)[1]
    assert "context.hf_overrides of its needles finetune manifest" in fix
    assert "training-free YaRN" not in fix  # a guessed override would probe it on a RoPE it never saw
    assert not (tmp_path / "o").exists()
    # inside the window it is probed with the model's RoPE, recorded as such
    overrides, info = probed_rope(model, adapter, None)
    assert overrides is None and info["source"] == NO_MANIFEST and info["window"] == NATIVE


def test_an_override_that_contradicts_the_adapters_manifest_is_refused(tmp_path):
    model = config_folder(tmp_path / "base")
    adapter = adapter_folder(tmp_path / "run", manifest={"context": {"hf_overrides": OVERRIDES}})
    other = {"rope_parameters": {**ROPE, "factor": 4.0}, "max_position_embeddings": 4 * NATIVE}
    with pytest.raises(NeedlesError, match="but the adapter .* was trained with") as exc:
        probed_rope(model, adapter, json.dumps(other))
    assert "drop --hf-overrides" in exc.value.fix
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    with pytest.raises(NeedlesError, match="was trained with"):  # the unscaled base, asked for explicitly
        probed_rope(model, adapter, json.dumps(plain))
    # the same RoPE with another window is the user's to choose
    assert probed_rope(model, adapter, json.dumps({**OVERRIDES, "max_position_embeddings": 900}))[1]["window"] == 900


def test_a_model_other_than_the_base_the_adapter_names_is_refused(tmp_path):
    trained_on = config_folder(tmp_path / "extended", max_position_embeddings=1024, rope_parameters=ROPE)
    plain = config_folder(tmp_path / "plain")
    adapter = adapter_folder(tmp_path / "run", base=trained_on)
    with pytest.raises(NeedlesError, match="was trained on .*extended") as exc:
        probed_rope(plain, adapter, None)
    assert exc.value.fix == f"probe it on the model it was trained on: --model {trained_on}"
    assert probed_rope(trained_on, adapter, None)[1]["window"] == 1024
    # a base that cannot be read (a hub id not in the cache) is no evidence either way
    assert probed_rope(plain, adapter_folder(tmp_path / "hub", base="someone/not-cached"), None)[0] is None


def test_patch_loads_adapters_with_their_rope_and_refuses_one_without_past_the_window(tiny_llama_dir, tmp_path, capsys):
    small = tmp_path / "small"  # the tiny Llama cut to a 512-token window
    shutil.copytree(tiny_llama_dir, small)
    conf = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": NATIVE}))
    scores = tmp_path / "heads.json"
    scorefile.write_json(scores, {"schema": scorefile.SCHEMA, "threshold": 0.1, "scores": [[0.5, 0.0], [0.0, 0.3]],
                                  "model": {}})  # fmt: skip
    adapter = adapter_folder(tmp_path / "elsewhere", base=small)
    argv = ["heads", "patch", "--source", str(small), "--target", str(small), "--source-heads", str(scores),
            "--target-heads", str(scores), "--target-adapter", str(adapter), "--sets", "0-0", "--eval-lengths",
            "800", "-o", str(tmp_path / "o")]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "--eval-lengths [800] do not fit the window the model is probed with (512" in err, err
    assert "OUT/manifest.json next to OUT/adapter" in err and "--hf-overrides" not in err and "Traceback" not in err


def test_patch_fix_for_an_adapter_without_manifest_names_no_flag_it_lacks(tmp_path):
    """`needles heads patch` has no --hf-overrides: its fix must point at the manifest, not at that flag."""
    from harness_ext.heads.rope_window import NO_MANIFEST, check_probe_lengths

    info = {"window": 1024, "source": NO_MANIFEST}
    with pytest.raises(NeedlesError) as probe:
        check_probe_lengths({"--lengths": [4096]}, 8, info, tmp_path)
    with pytest.raises(NeedlesError) as patch:
        check_probe_lengths({"--eval-lengths": [4096]}, 8, info, tmp_path, takes_overrides=False)
    assert "--hf-overrides" in probe.value.fix
    assert "--hf-overrides" not in patch.value.fix and "OUT/manifest.json next to OUT/adapter" in patch.value.fix
