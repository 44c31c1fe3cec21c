"""NIAH prompt counts as sums of parts: exact against whole-prompt tokenization, refused where not provable.

Real SmolLM2 tokenizer, the real retrieval-head haystack (../shared/data), the generator's own renderer.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
from harness_ext.tasklib import niah_count
from harness_ext.tasklib.niah_count import SpliceCounter
from harness_ext.tasklib.niah_generator import NiahGenerator
from harness_ext.tasklib.niah_haystack import Needle, NiahSpec, load_haystack, piece_stream
from harness_ext.tasklib.token_budget import additive_tokenizer, count_tokens

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLES = [
    Needle("The best thing to do in San Francisco is eating a sandwich.", "What is best in SF?", "eating a sandwich"),
    Needle('Code "4-2" (yes!) unlocks the door\u2026', "Which code?", '"4-2"'),
]


@pytest.fixture(scope="module")
def meta(shared_data, smollm2_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("niah-mirror")
    for rel in RETRIEVAL_HEAD.files:
        src = shared_data / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    return {"pretrained": str(smollm2_dir), "niah_mirror": str(out)}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


def _generator(meta, tok, haystack: str, template: str | None = None) -> NiahGenerator:
    text, _ = load_haystack(haystack, meta)
    spec = NiahSpec(lengths=(512,), depths=DEPTHS, num_samples=2, haystack=haystack, prompt_template=template)
    return NiahGenerator(spec, NEEDLES, piece_stream(text, tok), tok)


@pytest.mark.parametrize(("haystack", "template"), [("text", None), ("raw", None), ("text", "user")])
def test_summed_counts_equal_whole_prompt_tokenization(meta, tok, tmp_path, haystack, template):
    if template == "user":  # the context glued to punctuation on both sides, the question before it
        path = tmp_path / "t.jinja"
        path.write_text("Q: {{ question }}\n[[{{ context }}]]...\nA:")
        template = str(path)
    gen = _generator(meta, tok, haystack, template)
    counter, stream = gen._splice, gen.stream
    assert counter is not None
    rng = np.random.default_rng(3)
    starts = rng.choice(stream.starts, 6)
    cases = [(int(s), int(k)) for s in starts for k in (1, 2, 3, int(rng.integers(4, 2500)))]
    cases.append((int(stream.starts[-1]), len(stream) - int(stream.starts[-1]) + 40))  # wraps around the stream
    checked = 0
    for needle in NEEDLES:
        for start, k in cases:
            wraps_raw = haystack == "raw" and (start, k) == cases[-1]  # the raw stream's first piece has no lead
            assert counter.window_ok(needle, start, k) != wraps_raw
            if wraps_raw:
                continue
            offsets = sorted({0, k, *gen._insertions(start, k), *rng.integers(0, k + 1, 3).tolist()})
            offsets = [j for j in offsets if j in (0, k) or stream.boundary[(start + j) % len(stream)]]
            got = counter.counts(needle, start, k, gen._piece_sums(start, k), offsets)
            prompts = [gen._prompt_at(needle, start, k, j) for j in offsets]
            assert got == count_tokens(tok, prompts), (start, k, offsets)
            checked += len(offsets)
    assert checked > 100


def test_only_provably_additive_tokenizers_and_verbatim_templates_are_summed(meta, tok, smollm2_dir, tmp_path):
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    class Backend:  # what additive_tokenizer reads of a transformers tokenizer
        def __init__(self, backend):
            self.backend_tokenizer = backend

    assert additive_tokenizer(tok)
    llama3 = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    variants = {
        "llama3 regex": lambda b: setattr(
            b,
            "pre_tokenizer",
            pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(llama3), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
            ),
        ),
        "prefix space": lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "normalizer": lambda b: setattr(b, "normalizer", normalizers.NFKC()),
        "truncation": lambda b: b.enable_truncation(64),
    }
    for name, change in variants.items():
        backend = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
        assert additive_tokenizer(Backend(backend)), name
        change(backend)
        assert not additive_tokenizer(Backend(backend)), name
    assert not additive_tokenizer(object())  # a slow tokenizer: no pipeline to read
    for body in ("{{ context | upper }} {{ question }}", "{{ context }} {{ question }} {{ context }}"):
        path = tmp_path / f"t{len(body)}.jinja"
        path.write_text(body)
        gen = _generator(meta, tok, "text", str(path))
        assert gen._splice is not None and not gen._splice.window_ok(NEEDLES[0], int(gen.stream.starts[0]), 10)


def test_a_wrong_sum_is_caught_by_the_check_and_the_cell_redone(meta, tok, monkeypatch, caplog):
    text, _ = load_haystack("text", meta)
    spec = NiahSpec(lengths=(300, 900), depths=DEPTHS, num_samples=2, seed=4)
    stream = piece_stream(text, tok)
    right = NiahGenerator(spec, NEEDLES, stream, tok).generate()
    honest = niah_count.SpliceCounter.counts

    def one_short(self, *args):  # a sum that undercounts would put prompts over their target
        return [n - 1 for n in honest(self, *args)]

    monkeypatch.setattr(SpliceCounter, "counts", one_short)
    with caplog.at_level(logging.WARNING):
        gen = NiahGenerator(spec, NEEDLES, stream, tok)
        rows = gen.generate()
    assert gen._splice is None and "counting whole prompts" in caplog.text
    assert json.dumps(rows) == json.dumps(right)
    assert all(r["n_tokens"] == count_tokens(tok, [r["prompt"]])[0] <= r["target_tokens"] for r in rows)


def test_pieces_counted_in_one_encode_equal_counting_each_alone(meta, tok):
    from harness_ext.tasklib.token_budget import count_pieces, count_plain

    texts = []
    for haystack in ("text", "raw"):
        pieces = piece_stream(load_haystack(haystack, meta)[0], tok).pieces
        texts += pieces[:1500] + pieces[-1500:]  # the raw stream's first piece has no leading whitespace
    texts += ["", "   ", "\u00a0nbsp.", " \u3000wide", " tail ", "\n\n\u2019quoted\u2019?", " 12345678", " \U0001f600!"]
    assert count_pieces(tok, texts).tolist() == count_plain(tok, texts).tolist()
