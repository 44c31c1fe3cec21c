"""The passkey family: scoring rule, exact lengths, key placement, determinism across processes, metadata errors."""

from __future__ import annotations

import json

import pytest
from other_process import dataset_in_another_process

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.tasklib.breakdowns import parse_name
from harness_ext.tasklib.passkey import (
    FILLER,
    QUESTION,
    filler_stream,
    passkey,
    passkey_dataset,
    passkey_match,
    plain_prompt,
    process_results,
)
from harness_ext.tasklib.token_budget import count_tokens

TASK = "needles_passkey"
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
SMALL = {"passkey_lengths": [200, 400], "passkey_depths": [0.0, 0.5, 1.0], "passkey_num_samples": 2}


@pytest.fixture(scope="module")
def meta(smollm2_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEEDLES_CACHE_DIR", str(tmp_path_factory.mktemp("passkey-cache")))
        yield {**SMALL, "pretrained": str(smollm2_dir)}


@pytest.fixture(scope="module")
def rows(meta):
    return passkey_dataset(TASK, meta)["test"].to_list()


@pytest.mark.parametrize(
    "reply,score",
    [
        (" 71432.", 1.0),
        ("71432 is the pass key.", 1.0),
        ("The pass key is 71432. Remember it.", 1.0),
        (" 71432123", 0.0),  # a longer number is another number
        ("7143", 0.0),
        (" 1. The pass key is 71432", 0.0),  # the first number counts, not any number
        ("71,432", 0.0),
        ("seventy-one thousand", 0.0),
        ("", 0.0),
    ],
)
def test_first_number_must_equal_the_key(reply, score):
    assert passkey_match("71432", reply) == score


def test_process_results_keys_and_breakdowns():
    doc = {"target": "12345", "target_tokens": 1024, "depth": 0.25}
    out = process_results(doc, ["12345"])
    assert out == {
        "passkey_acc": 1.0,
        "passkey_acc_len1024": 1.0,
        "passkey_acc_depth0.25": 1.0,
        "passkey_acc_len1024_depth0.25": 1.0,
    }
    cell = parse_name("passkey_acc_len1024_depth0.25")
    assert (cell.base, cell.length, cell.position, cell.position_kind) == ("passkey_acc", 1024, "0.25", "depth")
    assert process_results(doc, ["no idea"])["passkey_acc"] == 0.0


def test_prompts_have_exact_lengths_and_the_reference_text(rows, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    assert len(rows) == 2 * 2 * 3
    # the exact length is the plain rendering's: the user turn, a space, the reply's cue (lm-eval's gen_prefix)
    assert count_tokens(tok, [plain_prompt(r) for r in rows]) == [r["n_tokens"] for r in rows]
    for r in rows:
        assert r["prompt"].endswith("\nWhat is the pass key?") and r["answer_prefix"] == "The pass key is"
        assert r["target_tokens"] - 12 <= r["n_tokens"] <= r["target_tokens"], r["n_tokens"]  # within a few words
        key = r["target"]
        assert len(key) == 5 and key.isdigit() and key == r["passkey"] == str(passkey(0, r["sample"]))
        line = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert plain_prompt(r).startswith(INTRO) and plain_prompt(r).endswith("\n" + QUESTION)
        context = plain_prompt(r)[len(INTRO) : -len(QUESTION) - 1]
        assert context.count(line) == 1 and context.count(key) == 2
        filler = context.replace(line, " ").split()
        assert " ".join(filler) in " ".join([FILLER] * 200)  # the rest is the repeated filler, in order


def test_key_sits_at_the_requested_depth_and_depths_are_paired(rows):
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault((r["sample"], r["target_tokens"]), []).append(r)
    for cell in by_cell.values():
        assert len({(r["window_start"], r["window_pieces"], r["passkey"]) for r in cell}) == 1
        for r in cell:
            assert abs(r["needle_depth"] - r["depth"]) < 0.1, (r["depth"], r["needle_depth"])
            context = plain_prompt(r)[len(INTRO) : -len(QUESTION) - 1]
            at = context.index("The pass key is")
            if r["depth"] == 0.0:
                assert at == 0
            elif r["depth"] == 1.0:  # last, after the window's last word (NIAH's rule for depth 1)
                assert context.endswith(f"{r['passkey']} is the pass key.")
            else:
                assert context[at - 2 : at] == ". "  # on a sentence boundary of the filler
    assert len({r["passkey"] for r in rows}) == 2  # one key per sample


def test_rows_are_byte_identical_in_another_process(meta, rows, tmp_path):
    builder = "harness_ext.tasklib.passkey:passkey_dataset"
    other = dataset_in_another_process(builder, "needles_passkey", meta, tmp_path / "other-cache", "7")
    assert json.dumps(other["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)
    assert other["sha"] == passkey_dataset(TASK, meta).needles_info["needles_data_sha256"]


def test_filler_stream_wraps_between_sentences(smollm2_dir):
    stream = filler_stream(load_tokenizer(str(smollm2_dir)))
    assert stream.join(0, 2 * len(stream)).strip() == FILLER + " " + FILLER


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"passkey_lenghts": [512]}, 'did you mean "passkey_lengths"'),
        ({"passkey_lengths": [64]}, "passkey_lengths"),
        ({"passkey_depths": [0.5, 0.501]}, "repeats a depth"),
        ({"passkey_depths": [1.5]}, "outside 0.0"),
        ({"passkey_num_samples": 0}, "passkey_num_samples"),
    ],
)
def test_metadata_errors_are_clear(meta, extra, message):
    with pytest.raises(NeedlesError, match=message):
        passkey_dataset(TASK, {**meta, **extra})


def test_tokenizer_is_required():
    with pytest.raises(NeedlesError, match="needs its tokenizer"):
        passkey_dataset(TASK, dict(SMALL))
