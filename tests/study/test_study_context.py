"""A study variant trained with a `finetune.context` section (a RoPE change) is scored with that RoPE: its
adapter is served with the run's hf_overrides (vLLM), and the hf backend, which has no such override for an
adapter, is refused before anything runs."""

from __future__ import annotations

import json

from harness_ext.cli.app import main


def _config(model: str, backend: str, **finetune) -> dict:
    return {
        "name": "s",
        "model": model,
        "reference_variant": "real",
        "finetune": {"data": {"num_samples": 4, "num_dicts": 4, "lengths": None}, "max_steps": 1,
                     "context": {"length": 16384, "rope": {"type": "yarn"}}, **finetune},
        "variants": [{"name": "real"}, {"name": "synth", "finetune": {"data": {"seed": 1}}}],
        "targets": [{"task": "kv_retrieval_simple", "metric": "value_acc"}],
        "metadata": {"num_dicts": 4, "num_samples": 2, "lengths": None},
        "backend": backend,
        "k": 1,
        "in_distribution": False,
    }  # fmt: skip


def _dry_run(capsys, tmp_path, config) -> tuple[int, dict, str]:
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["study", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    evals = {a[2:].split()[0]: b for a, b in zip(lines, lines[1:]) if a.startswith("# eval:")}
    return code, evals, err


def test_an_extended_adapter_is_served_with_its_rope(capsys, tmp_path, tiny_llama_dir):
    code, evals, err = _dry_run(capsys, tmp_path, _config(str(tiny_llama_dir), "vllm"))
    assert code == 0, err
    assert "lora_local_path=" in evals["eval:synth"] and "hf_overrides=" in evals["eval:synth"]
    overrides = json.loads(evals["eval:synth"].split("hf_overrides=")[1].split()[0].strip("'"))
    assert overrides["max_position_embeddings"] == 16384 and "yarn" in json.dumps(overrides)
    assert "hf_overrides=" not in evals["eval:base"]  # the base model is scored as it is


def test_the_hf_backend_refuses_an_extended_adapter_with_the_fix(capsys, tmp_path, tiny_llama_dir):
    code, _, err = _dry_run(capsys, tmp_path, _config(str(tiny_llama_dir), "hf"))
    assert code == 2 and "unscaled base model" in err and "backend: vllm" in err and "merge: true" in err
    code, evals, err = _dry_run(capsys, tmp_path, _config(str(tiny_llama_dir), "hf", merge=True))
    assert code == 0, err  # the merged model's config carries the RoPE
