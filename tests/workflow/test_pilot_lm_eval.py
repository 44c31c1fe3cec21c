"""The pilot check through the real lm_eval CLI: `needles study` (hf backend) scores the tiny random Llama on the
pilot's KV documents, finds every one at 0, and stops before the first finetune with the reason and the fix."""

from __future__ import annotations

import json

import pytest
from study_configs import kv_study

from harness_ext.cli import main


@pytest.mark.heavy
def test_a_random_model_at_floor_stops_the_study_before_training(tmp_path, tiny_llama_dir, capsys):
    metadata = {"num_dicts": 4, "num_samples": 8, "lengths": None, "depths": [0.5]}
    cfg = kv_study(str(tiny_llama_dir), metadata=metadata, gen_kwargs="max_gen_toks=8", in_distribution=False)
    (tmp_path / "s.yaml").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the pilot check stops the run" in err and "--skip-pilot-check" in err
    record = json.loads((out / "pilot.json").read_text())
    (row,) = record["tasks"]
    assert row["bound"] == "floor" and row["n"] == 8 and record["limit"] == 20  # 8 documents: fewer than the limit
    assert json.loads((out / "steps" / "pilot.json").read_text())["command"].endswith("--limit 20")
    assert not (out / "runs" / "real" / "finetune").exists()  # nothing trained
