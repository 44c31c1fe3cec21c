"""The natural-language NIAH family: rows (lengths, depths, pairing, determinism), metadata, scoring.

Rows are built from the real retrieval-head files (../shared/data, copied into an upstream-layout
mirror) with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from other_process import dataset_in_another_process

import harness_ext.tasklib.niah_generator
from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import LM_EVAL_KEYS
from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
from harness_ext.tasklib.breakdowns import parse_name
from harness_ext.tasklib.metadata_keys import FAMILY_KEYS
from harness_ext.tasklib.metrics import niah_success, rouge1_recall
from harness_ext.tasklib.niah import niah_dataset, process_results, spec_from_metadata
from harness_ext.tasklib.niah_haystack import (
    extract_text,
    load_haystack,
    needle_key,
    piece_stream,
    read_needles,
    split_of,
)
from harness_ext.tasklib.token_budget import count_plain, count_tokens

OTHER_FAMILY_KEYS = frozenset().union(*(k for f, k in FAMILY_KEYS.items() if f != "niah")) | LM_EVAL_KEYS
LENGTHS = [512, 1024]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def mirror(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("niah-mirror")
    for rel in RETRIEVAL_HEAD.files:
        src = shared_data / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    return out


@pytest.fixture
def meta(mirror, smollm2_dir, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEEDLES_NIAH_MIRROR", raising=False)
    return {
        "pretrained": str(smollm2_dir),
        "niah_mirror": str(mirror),
        "niah_lengths": LENGTHS,
        "niah_depths": DEPTHS,
        "niah_num_samples": 4,
        "version": 1.0,
    }


@pytest.fixture
def rows(meta) -> list[dict]:
    return niah_dataset("niah_single", meta)["test"].to_list()


def _context(prompt: str) -> str:
    assert prompt.startswith("<book>") and prompt.endswith("\nAnswer:")
    return prompt[len("<book>") : prompt.index("</book>\nBased on the content of the book, Question: ")]


def _cells(rows):
    cells = defaultdict(list)
    for r in rows:
        cells[(r["sample"], r["target_tokens"])].append(r)
    return cells


# ---------------------------------------------------------------------------------- rows
def test_rows_are_byte_identical_in_another_process(meta, rows, tmp_path):
    assert len(rows) == 4 * len(LENGTHS) * len(DEPTHS)
    builder = "harness_ext.tasklib.niah:niah_dataset"
    other = dataset_in_another_process(builder, "niah_single", meta, tmp_path / "other-cache", "123")
    assert json.dumps(other["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)
    again = niah_dataset("niah_single", meta)  # from the cache
    assert other["sha"] == again.needles_info["needles_data_sha256"]
    assert len({r["doc_sha256"] for r in rows}) == len(rows)


def test_prompts_hit_the_target_within_one_word(meta, rows, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    assert count_tokens(tok, [r["prompt"] for r in rows]) == [r["n_tokens"] for r in rows]
    text, _ = load_haystack("text", meta)
    stream = piece_stream(text, tok)
    for (_, length), cell in _cells(rows).items():
        longest = max(r["n_tokens"] for r in cell)
        assert all(r["n_tokens"] <= length for r in cell)
        start, k = cell[0]["window_start"], cell[0]["window_pieces"]
        cum = stream.cumulative(start, k + 1)
        # one more word (plus a boundary merge or two) would not fit, and a word is a few tokens
        assert length - longest <= cum[k + 1] - cum[k] + 2, (length, longest)
        assert length - longest < 16


def test_needle_sits_at_the_requested_depth_on_a_sentence_boundary(rows, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    for r in rows:
        context = _context(r["prompt"])
        at = context.index(r["needle"])
        assert context.count(r["needle"]) == 1
        before, after = context[:at], context[at + len(r["needle"]) :]
        if r["depth"] == 0.0:
            assert before == ""
        elif r["depth"] == 1.0:
            assert after == ""
        else:
            assert before.rstrip()[-1] in ".!?\"')]\u201d\u2019" and after[:1].isspace()
        hay_tokens = int(count_plain(tok, [before.rstrip() + after])[0])
        measured = int(count_plain(tok, [before.rstrip()])[0]) / hay_tokens if before else 0.0
        assert abs(measured - r["needle_depth"]) < 0.02
        assert abs(r["needle_depth"] - r["depth"]) < 0.15  # the nearest sentence boundary of ~500+ tokens


def test_depths_of_a_sample_share_window_and_needle(rows):
    import hashlib

    by_sample = defaultdict(set)
    for (sample, _), cell in _cells(rows).items():
        assert [r["depth"] for r in cell] == DEPTHS
        assert len({(r["window_sha256"], r["window_start"], r["window_pieces"], r["needle"]) for r in cell}) == 1
        for r in cell:  # the window is the context minus the needle (and the space that joins it)
            context = _context(r["prompt"])
            window = context.replace(" " + r["needle"], "", 1) if r["depth"] else context[len(r["needle"]) + 1 :]
            assert hashlib.sha256(window.encode()).hexdigest() == r["window_sha256"]
        by_sample[sample].add((cell[0]["needle"], cell[0]["window_start"]))
    assert all(len(v) == 1 for v in by_sample.values())  # the same draw at every length
    assert len({r["needle"] for r in rows}) == 3  # 4 samples cycle through the 3 reference needles
    assert len({r["window_start"] for r in rows}) == 4


def test_cache_hit_does_not_regenerate(meta, rows, monkeypatch):
    def boom(self):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(harness_ext.tasklib.niah_generator.NiahGenerator, "generate", boom)
    again = niah_dataset("niah_single", meta)
    assert again["test"].to_list() == rows
    info = again.needles_info
    assert info["needles_data_official"] and info["needles_alias_marks"] == []
    assert info["needles_data_files"][RETRIEVAL_HEAD_NEEDLES] == RETRIEVAL_HEAD.files[RETRIEVAL_HEAD_NEEDLES].sha256
    with pytest.raises(AssertionError, match="regenerated"):
        niah_dataset("niah_single", {**meta, "niah_seed": 5})


class _PlainSearch(harness_ext.tasklib.niah_generator.NiahGenerator):
    """The window search as first written: every visited window rendered and tokenized in full at every depth."""

    splice = False

    def _try(self, needle, start, k, length, fitting):
        n, res = self._render(needle, start, k)
        return n, (res if n <= length else None)


class _NoSplice(harness_ext.tasklib.niah_generator.NiahGenerator):
    """The cheaper search without the sums (the path of other tokenizers): early rejection only."""

    splice = False


def _skewed(cls, scale: float):
    """``cls`` with piece costs scaled: a poor first guess, so the search shrinks, grows and bisects."""

    class Skewed(cls):
        def _cumulative(self, start, count):
            return np.floor(super()._cumulative(start, count) * scale)

    return Skewed


@pytest.mark.parametrize(("haystack", "scale"), [("text", 1.0), ("raw", 1.0), ("text", 0.5), ("raw", 2.5)])
def test_cheaper_search_gives_the_rows_of_the_plain_search(meta, smollm2_dir, monkeypatch, haystack, scale):
    """Summed counts, early rejection and the memoised costs change the cost, never a decision or a byte."""
    from harness_ext.tasklib import niah_count, niah_generator
    from harness_ext.tasklib.niah_haystack import NiahSpec, load_reference_needles

    tok = load_tokenizer(str(smollm2_dir))
    text, _ = load_haystack(haystack, meta)
    needles, _ = load_reference_needles(meta)
    lengths = (300, 1024, 2048) if scale == 1.0 else (200, 700)
    spec = NiahSpec(lengths=lengths, depths=tuple(DEPTHS), num_samples=4, seed=9, haystack=haystack)
    chars = []  # characters sent to the tokenizer for prompts and prompt parts (piece costs are shared)

    def counting(count):
        def wrapped(tokenizer, texts):
            chars.append(sum(map(len, texts)))
            return count(tokenizer, texts)

        return wrapped

    monkeypatch.setattr(niah_generator, "count_tokens", counting(count_tokens))
    monkeypatch.setattr(niah_count, "count_plain", counting(count_plain))
    stream = piece_stream(text, tok)
    spent, rows = [], []
    for cls in (niah_generator.NiahGenerator, _NoSplice, _PlainSearch):
        chars[:] = []
        rows.append(_skewed(cls, scale)(spec, needles, stream, tok).generate())
        spent.append(sum(chars))
    assert json.dumps(rows[0]) == json.dumps(rows[2]) and json.dumps(rows[1]) == json.dumps(rows[2])
    assert spent[0] < spent[1] < spent[2]
    if haystack == "text":  # no window wraps the book: every cell is summed, tokenizing a tenth of the prompts
        assert spent[0] < spent[2] / 5
    fast = rows[0]
    assert all(r["n_tokens"] <= r["target_tokens"] for r in fast)
    # the counting path (offset-free batch encode) agrees with the tokenizer's own call
    prompts = [r["prompt"] for r in fast[:: len(DEPTHS)]]
    assert count_tokens(tok, prompts) == [len(ids) for ids in tok(prompts)["input_ids"]]


# ---------------------------------------------------------------------------------- haystack modes
def test_text_haystack_is_clean_prose_and_raw_is_the_file_bytes(meta, mirror):
    text, got = load_haystack("text", meta)
    raw, _ = load_haystack("raw", meta)
    assert raw == "".join((mirror / g.relpath).read_text(encoding="utf-8") for g in got)
    assert raw.startswith('{"features":[') and '"row_idx"' in raw
    assert '"row_idx"' not in text and "\\n" not in text
    assert "It was a feature peculiar to the colonial wars of North America, that\nthe toils" in text
    assert extract_text('{"rows":[{"row":{"text":"A \\"b\\".\\nC"}},{"row":{"text":"cut her') == 'A "b".\nC'


def test_piece_stream_boundaries_and_wraparound(smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    stream = piece_stream('\n\nOne two. Three "four!" Five six?', tok)
    assert stream.pieces == ["\n\nOne", " two.", " Three", ' "four!"', " Five", " six?"]
    assert stream.boundary.tolist() == [True, False, True, False, True, False]  # piece 0 follows "six?" cyclically
    assert stream.starts.tolist() == [0, 2, 4]
    assert stream.join(4, 9) == " Five six?\n\nOne two. Three"  # a window longer than the rest wraps around
    assert stream.boundaries(4, 5).tolist() == [2, 4]  # before "\n\nOne" and " Three"
    cum = stream.cumulative(4, 5)
    assert cum[-1] == sum(int(count_plain(tok, [p])[0]) for p in [" Five", " six?", "\n\nOne", " two.", " Three"])


def test_target_too_small_for_the_needle_is_refused(meta, tmp_path):
    long_needle = " ".join(["The long secret is hidden here."] * 40)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"needle": long_needle, "question": "What is hidden?", "real_needle": "secret"}) + "\n")
    with pytest.raises(NeedlesError, match="cannot hold the question, the needle"):
        niah_dataset("niah_single", {**meta, "niah_needles": str(path), "niah_lengths": [128]})


def test_raw_haystack_option(meta):
    ds = niah_dataset("niah_single", {**meta, "niah_lengths": [600], "niah_depths": [0.5], "niah_num_samples": 2})
    raw = niah_dataset(
        "niah_single",
        {**meta, "niah_lengths": [600], "niah_depths": [0.5], "niah_num_samples": 2, "niah_haystack": "raw"},
    )
    assert raw.needles_info["needles_alias_marks"] == ["raw haystack"]
    assert raw.needles_info["needles_data_sha256"] != ds.needles_info["needles_data_sha256"]
    assert all("\\n" in r["prompt"] and r["n_tokens"] <= 600 for r in raw["test"].to_list())


# ---------------------------------------------------------------------------------- needles
def _needles_file(path: Path, n: int) -> Path:
    lines = [
        json.dumps(
            {
                "needle": f"The secret code of room {i} is {1000 + i}.",
                "question": f"What is the code of room {i}?",
                "real_needle": f"{1000 + i}",
            }
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_and_exclusion_keep_training_needles_out(meta, tmp_path):
    path = _needles_file(tmp_path / "needles.jsonl", 12)
    needles = read_needles(path, "test")
    splits = {n.needle: split_of(n, 0.5) for n in needles}
    assert set(splits.values()) == {"train", "eval"}
    assert splits == {n.needle: split_of(n, 0.5) for n in read_needles(path, "again")}  # a fixed function
    small = {**meta, "niah_needles": str(path), "niah_lengths": [256], "niah_depths": [0.5], "niah_num_samples": 12}
    ds = niah_dataset("niah_single", {**small, "niah_split": "eval"})
    used = {r["needle"] for r in ds["test"].to_list()}
    assert used == {n for n, s in splits.items() if s == "eval"}
    assert "custom needles" in ds.needles_info["needles_alias_marks"]
    assert str(path.resolve()) in ds.needles_info["needles_data_files"]

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(line for line in path.read_text().splitlines()[:5]) + "\n")
    ds = niah_dataset("niah_single", {**small, "niah_exclude_needles": str(train_file)})
    used = {r["needle"] for r in ds["test"].to_list()}
    assert used == {n.needle for n in needles[5:]}
    assert "7 of 12 needles" in ds.needles_info["needles_alias_marks"]
    ds = niah_dataset("niah_single", {**small, "niah_exclude_needles": [needles[0].needle.upper()]})
    assert needles[0].needle not in {r["needle"] for r in ds["test"].to_list()}  # case-insensitive identity
    with pytest.raises(NeedlesError, match="no needle is left"):
        niah_dataset("niah_single", {**small, "niah_exclude_needles": str(path)})


def test_bad_needles_file_is_refused(meta, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"needle": "x.", "question": "q?"}\n')
    with pytest.raises(NeedlesError, match="line 1 lacks real_needle"):
        niah_dataset("niah_single", {**meta, "niah_needles": str(bad)})
    with pytest.raises(NeedlesError, match="does not exist"):
        niah_dataset("niah_single", {**meta, "niah_needles": str(tmp_path / "none.jsonl")})


# ---------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"niah_lenghts": [1024]}, 'did you mean "niah_lengths"'),
        ({"niah_dephts": [0.5]}, 'did you mean "niah_depths"'),
        ({"niah_lengths": "1024"}, "niah_lengths='1024' is not a non-empty list"),
        ({"niah_lengths": [1024.5]}, "is not an integer"),
        ({"niah_lengths": [True]}, "is not an integer"),
        ({"niah_lengths": [64]}, "is outside 128"),
        ({"niah_lengths": [1024, 1024]}, "repeats a length"),
        ({"niah_depths": [0.5, 1.5]}, "has a depth outside 0.0"),
        ({"niah_depths": [0.5, 0.501]}, "repeats a depth"),
        ({"niah_depths": ["middle"]}, "is not a list of numbers"),
        ({"niah_num_samples": 0}, "is outside 1"),
        ({"niah_seed": "abc"}, "is not an integer"),
        ({"niah_haystack": "json"}, "is not one of ['text', 'raw']"),
        ({"niah_split": "test"}, "is not one of ['all', 'train', 'eval']"),
        ({"niah_train_fraction": 1.0}, "strictly between 0 and 1"),
        ({"niah_exclude_needles": 3}, "is neither a needles .jsonl path"),
        ({"niah_needles": ""}, "is not a non-empty string"),
    ],
)
def test_metadata_errors_are_clear(extra, message):
    with pytest.raises(NeedlesError) as exc:
        spec_from_metadata("niah_single", {"version": 1.0, **extra})
    assert message in str(exc.value) + " " + (exc.value.fix or "")


def test_other_families_keys_pass_and_tokenizer_is_required(mirror):
    spec = spec_from_metadata("niah_single", {k: 1 for k in OTHER_FAMILY_KEYS} | {"niah_depths": 0.5})
    assert spec.depths == (0.5,) and spec.lengths == (1024, 2048)
    assert {"lengths", "mdqa_mirror", "flenqa_ctx_sizes", "config_source"} <= OTHER_FAMILY_KEYS
    with pytest.raises(NeedlesError, match="needs its tokenizer"):
        niah_dataset("niah_single", {"niah_mirror": str(mirror)})


# ---------------------------------------------------------------------------------- scoring
def test_rouge1_recall_and_success_rule():
    ref = "take a walk in Chaoyang Park and have a cup of Espresso in the evening"
    assert rouge1_recall(ref, ref) == 1.0
    assert rouge1_recall(ref, "") == 0.0
    assert rouge1_recall("walk in the park", "They were walking near the parks.") == pytest.approx(3 / 4)  # stemmed
    assert rouge1_recall("a b c d", "a b x") == 0.5
    assert niah_success("a b c d", "a b x") == 0.0  # exactly 0.5 is not a success (> 0.5, as the reference)
    assert niah_success("a b c d", "A, B and C!") == 1.0
    assert rouge1_recall("Because he is a mean person", "He is mean.") == pytest.approx(3 / 6)


def test_process_results_keys_and_breakdowns():
    doc = {"real_needle": "take a walk in Chaoyang Park", "target_tokens": 2048, "depth": 0.5}
    out = process_results(doc, ["  You should take a walk in Chaoyang Park.\n"])
    assert out["niah_success"] == 1.0 and out["rouge1_recall"] == 1.0
    assert set(out) == {
        f"{m}{s}"
        for m in ("niah_success", "rouge1_recall")
        for s in ("", "_len2048", "_depth0.50", "_len2048_depth0.50")
    }
    b = parse_name("niah_success_len2048_depth0.50")
    assert (b.base, b.length, b.position, b.position_kind) == ("niah_success", 2048, "0.50", "depth")
    out = process_results({**doc, "depth": 0.0}, ["I do not know."])
    assert out["niah_success_depth0.00"] == 0.0 and out["rouge1_recall_len2048_depth0.00"] == 0.0


def test_needle_key_identity():
    assert needle_key("  The  Best thing\nto do. ") == "the best thing to do."
