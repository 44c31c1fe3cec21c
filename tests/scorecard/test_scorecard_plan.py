"""`needles scorecard`'s plan: the length ladder up to the served window, the budgets, the cost printed first, and the
refusals (exit 2 with a fix) before anything runs. No model runs here: a config.json is all the plan reads."""

from __future__ import annotations

import json

import pytest

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.scorecard.plan import BUDGETS, ladder, make_plan


def _model(tmp_path, window: int = 4096, tokenizer_cap: int | None = None):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": window,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_cap:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer_cap}))
    return folder


def test_ladder_reaches_the_served_window(tmp_path):
    assert ladder(8192) == [256, 512, 1024, 2048, 4096, 7936]
    assert ladder(4096) == [256, 512, 1024, 2048, 3840]
    model = _model(tmp_path, 8192, tokenizer_cap=2048)  # vLLM caps the window by the tokenizer's limit
    plan = make_plan("m", str(model), "default")
    assert plan.window == 2048 and plan.lengths == [256, 512, 1024, 1792] and "model_max_length" in plan.window_source
    kv = next(r for r in plan.runs if r.family == "kv")
    assert kv.metadata == {"lengths": [256, 512, 1024, 1792], "depths": [0.0, 0.5, 1.0], "num_samples": 1, "seed": 1000}
    assert kv.documents == 12 and kv.prompt_tokens == 3 * (256 + 512 + 1024 + 1792)
    mdqa = next(r for r in plan.runs if r.family == "mdqa")  # 20 documents do not fit 2048 tokens: 10
    assert mdqa.metadata["synth_num_documents"] == 10 and mdqa.metadata["synth_positions"] == [1, 10]
    flenqa = next(r for r in plan.runs if r.family == "flenqa")
    assert flenqa.metadata["flenqa_ctx_sizes"] == [250, 500, 1000] and flenqa.limit == 10
    full = make_plan("m", str(_model(tmp_path / "b", 16384)), "full")
    assert [r.family for r in full.runs] == ["kv", "niah", "mdqa", "synth", "flenqa"]
    assert full.lengths[-1] == 16384 - 256 and set(BUDGETS) == {"tiny", "small", "default", "full"}


def test_bad_options_exit_2_with_the_fix(tmp_path, capsys):
    model = _model(tmp_path, 4096)
    with pytest.raises(NeedlesError, match="past the model's window"):
        make_plan("m", str(model), "default", max_model_len=8192)
    cases = [
        (["scorecard", str(model), "--budget", "huge"], "is not a budget"),
        (["scorecard", str(model), "--lengths", "100000"], "outside 128 .. 3840"),
        (["scorecard", str(model), "--threshold", "0.85"], "outside the 0-100 scale"),
        (["scorecard", str(model), "--relative", "1.5"], "outside (0, 1)"),
        (["scorecard", "--compare", str(tmp_path)], "exactly two scorecards"),
        (["scorecard", "--compare", "a", "b", "c"], "3 inputs given"),
        (["scorecard"], "no model given"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "fix:" in err and "Traceback" not in err, (argv, err)


def test_dry_run_prints_the_cost_first_and_the_commands(tmp_path, capsys):
    model = _model(tmp_path, 4096)
    assert main(["scorecard", str(model), "--budget", "small", "-o", str(tmp_path / "out"), "--dry-run",
                 "--seconds-per-kilotoken", "3"]) == 0  # fmt: skip
    cap = capsys.readouterr()
    assert "window 4096 tokens" in cap.err and "cost estimate" in cap.err and "~" in cap.err and " min" in cap.err
    commands = [line for line in cap.out.splitlines() if line.startswith("lm_eval run")]
    assert len(commands) == 4 and all("--log_samples" in c and "max_model_len=4096" in c for c in commands)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
