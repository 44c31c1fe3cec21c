"""`needles scorecard`'s plan: the length ladder up to the served window, the budgets, the cost printed first, and the
refusals (exit 2 with a fix) before anything runs. No model runs here: a config.json is all the plan reads."""

from __future__ import annotations

import json

import pytest

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.scorecard.plan import BUDGETS, format_cost, ladder, make_plan
from harness_ext.scorecard.run import check_data, eval_argv
from harness_ext.tasklib.long_ppl_text import BOOK_PART


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
    assert [r.family for r in full.runs] == ["kv", "niah", "passkey", "mdqa", "synth", "flenqa", "long_ppl"]
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
    assert len(commands) == 6 and all("--log_samples" in c and "max_model_len=4096" in c for c in commands)
    assert [("--apply_chat_template" in c, "needles_long_ppl" in c) for c in commands].count((False, True)) == 1
    assert sum("--apply_chat_template" in c for c in commands) == 5
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_passkey_and_loss_families_on_the_ladder(tmp_path):
    plan = make_plan("m", str(_model(tmp_path, 8192)), "default")
    runs = {r.family: r for r in plan.runs}
    # passkey: the scorecard's ladder (the reserve holds the chat template and its 16 generated tokens)
    assert runs["passkey"].tasks == ["needles_passkey"] and runs["passkey"].metadata == {
        "passkey_lengths": [256, 512, 1024, 2048, 4096, 7936],
        "passkey_depths": [0.0, 1.0],
        "passkey_num_samples": 1,
    }
    assert runs["passkey"].documents == 12 and runs["passkey"].prompt_tokens == 2 * (
        256 + 512 + 1024 + 2048 + 4096 + 7936
    )
    # the loss: plain text, so the ladder goes up to the window less the 128-token continuation
    ppl = runs["long_ppl"]
    assert ppl.metadata == {"long_ppl_contexts": [256, 512, 1024, 2048, 4096, 8064], "long_ppl_continuation": 128,
                            "long_ppl_num_docs": 4}  # fmt: skip
    assert ppl.documents == 24 and ppl.prompt_tokens == 4 * (256 + 512 + 1024 + 2048 + 4096 + 8064 + 6 * 128)
    out = tmp_path / "out"
    argv = eval_argv(plan, ppl, out)
    assert "--apply_chat_template" not in argv and argv[argv.index("--tasks") + 1] == "needles_long_ppl"
    assert json.loads(argv[argv.index("--metadata") + 1]) == ppl.metadata and "max_model_len=8192" in " ".join(argv)
    assert "--apply_chat_template" in eval_argv(plan, runs["passkey"], out)
    cost = format_cost(plan)
    assert "  passkey: needles_passkey: 12 prompts, ~31,744 prompt tokens" in cost
    assert "  long_ppl: needles_long_ppl: 24 prompts, ~67,072 prompt tokens (log-likelihoods, no chat template)" in cost
    # a long window: the loss stops where the held-out book still holds every document after its context
    long = {r.family: r for r in make_plan("m", str(_model(tmp_path / "long", 131072)), "full").runs}
    assert long["long_ppl"].metadata["long_ppl_contexts"] == [256, 512, 1024, 2048, 4096, 8192, 16384]
    assert (
        long["long_ppl"].metadata["long_ppl_num_docs"] == 16
        and long["passkey"].metadata["passkey_lengths"][-1] == 130816
    )
    # fixed lengths (the tiny budget, --lengths): the same lengths for both, a handful of prompts
    tiny = {r.family: r for r in make_plan("m", str(_model(tmp_path / "tiny", 8192)), "tiny").runs}
    assert tiny["passkey"].metadata["passkey_lengths"] == [256, 512] and tiny["passkey"].documents == 4
    assert tiny["long_ppl"].metadata["long_ppl_contexts"] == [256, 512] and tiny["long_ppl"].documents == 2
    given = {
        r.family: r for r in make_plan("m", str(_model(tmp_path / "given", 4096)), "small", lengths=[3840, 300]).runs
    }
    assert (
        given["long_ppl"].metadata["long_ppl_contexts"] == [300, 3840] == given["passkey"].metadata["passkey_lengths"]
    )


def test_loss_family_is_left_out_without_the_book_like_niah(tmp_path, shared_data, monkeypatch):
    plan = make_plan("m", str(_model(tmp_path, 4096)), "tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    for env in ("NEEDLES_NIAH_MIRROR", "NEEDLES_MDQA_MIRROR", "NEEDLES_FLENQA_MIRROR"):
        monkeypatch.setenv(env, str(empty))
    data = check_data(plan, lambda _: None)
    assert data["kept"] == ["kv", "passkey"]  # synthetic: no download
    skipped = {s["family"]: s for s in data["skipped"]}
    assert BOOK_PART in skipped["long_ppl"]["reason"] and skipped["long_ppl"]["fix"]
    book_only = tmp_path / "book"  # the held-out part alone: the loss runs, NIAH (needles, other parts) does not
    (book_only / BOOK_PART).parent.mkdir(parents=True)
    (book_only / BOOK_PART).write_bytes((shared_data / "retrieval-head" / BOOK_PART).read_bytes())
    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(book_only))
    assert check_data(plan, lambda _: None)["kept"] == ["kv", "passkey", "long_ppl"]
