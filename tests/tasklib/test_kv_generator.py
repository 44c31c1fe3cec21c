"""Properties of the synthetic KV generator, checked with the real SmolLM2 tokenizer."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec
from harness_ext.tasklib.token_budget import count_tokens

LINE = re.compile(r"^Dictionary \[(\d+)\] (\{.*\})$")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _dicts(prompt: str) -> list[tuple[int, dict]]:
    out = []
    for line in prompt.splitlines():
        m = LINE.match(line)
        if m:
            out.append((int(m.group(1)), ast.literal_eval(m.group(2))))
    return out


def _numbers(prompt: str) -> list[str]:
    body = "\n".join(line for line in prompt.splitlines() if LINE.match(line))
    body = re.sub(r"Dictionary \[\d+\] ", "", body)
    return re.findall(r"\d+", body)


@pytest.mark.parametrize("template", [False, True])
def test_simple_reference_rules(template):
    docs = KVGenerator(
        KVSpec(num_samples=8, lengths=None, num_dicts=85, depths=None, answer_template=template)
    ).generate()
    assert len(docs) == 8
    for d in docs:
        dicts = _dicts(d["prompt"])
        assert [name for name, _ in dicts] == list(range(1, 86))  # named in order, 85 of them
        gold_name, gold = dicts[d["gold_dict"] - 1]
        assert len(gold) == 3 and int(d["gold_key"]) in gold and gold[int(d["gold_key"])] == int(d["gold_value"])
        for name, dct in dicts:
            if name != d["gold_dict"]:
                assert 3 <= len(dct) <= 4
            for k, v in dct.items():
                assert 100 <= k <= 9999 and 100 <= v <= 9999
        nums = _numbers(d["prompt"])
        # gold key and gold value each appear exactly once among all keys and values
        assert nums.count(d["gold_key"]) == 1 and nums.count(d["gold_value"]) == 1
        assert d["target"] == (
            f"The value of key {d['gold_key']} is {d['gold_value']} and it is in Dictionary [{d['gold_dict']}]."
        )


def test_uniform_positions_cover_the_range():
    docs = KVGenerator(KVSpec(num_samples=200, lengths=None, num_dicts=20, depths=None)).generate()
    positions = {d["gold_index"] for d in docs}
    assert min(positions) == 0 and max(positions) == 19 and len(positions) >= 15


def test_controlled_depths_are_paired(tok):
    spec = KVSpec(num_samples=3, lengths=(700,), depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    docs = KVGenerator(spec, tok).generate()
    assert len(docs) == 15
    for i in range(3):
        group = [d for d in docs if d["sample"] == i]
        m = group[0]["num_dicts"]
        assert [d["gold_index"] for d in group] == [round(x * (m - 1)) for x in spec.depths]
        assert group[0]["gold_index"] == 0 and group[-1]["gold_index"] == m - 1
        # same dictionaries at every depth: only the gold dictionary moves
        contents = [sorted(json.dumps(sorted(dct.items())) for _, dct in _dicts(d["prompt"])) for d in group]
        assert all(c == contents[0] for c in contents)
        assert len({d["gold_value"] for d in group}) == 1


@pytest.mark.parametrize("variant", ["simple", "multisubkey"])
def test_length_targets_are_exact_and_tight(tok, variant):
    spec = KVSpec(variant=variant, num_samples=12, lengths=(512, 2000, 4096), depths=(0.0, 0.5, 1.0))
    gen = KVGenerator(spec, tok)
    docs = gen.generate()
    exact = count_tokens(tok, [d["prompt"] for d in docs])
    for d, n in zip(docs, exact):
        assert d["n_tokens"] == n  # recorded count is the real one
        assert n <= d["target_tokens"]  # never over the budget
        # within one dictionary line of the target (lines are ~35-60 tokens with this tokenizer)
        assert d["target_tokens"] - n <= 64 + 0.02 * d["target_tokens"], (n, d["target_tokens"])


def test_multisubkey_rules(tok):
    docs = KVGenerator(KVSpec(variant="multisubkey", num_samples=10, lengths=(1500,), depths=(0.5,)), tok).generate()
    for d in docs:
        subkeys = {int(x) for x in d["gold_key"].split(", ")}
        assert len(subkeys) == 3
        seen_gold = 0
        shared_some = False
        for _, dct in _dicts(d["prompt"]):
            for key, value in dct.items():
                assert isinstance(key, tuple) and len(key) == 3 and len(set(key)) == 3
                if set(key) == subkeys:
                    seen_gold += 1
                    assert value == int(d["gold_value"])
                else:
                    assert value != int(d["gold_value"])
                    shared_some |= len(set(key) & subkeys) > 0
        assert seen_gold == 1  # no distractor holds all gold subkeys, in any order
        assert shared_some  # but distractors do share some
        assert "(not necessarily in this order)" in d["prompt"]


def test_determinism_across_processes(smollm2_dir):
    code = (
        "import json,sys; from transformers import AutoTokenizer; from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec;"
        f"t=AutoTokenizer.from_pretrained({str(smollm2_dir)!r});"
        "d=KVGenerator(KVSpec(variant=sys.argv[1], num_samples=4, lengths=(900,), depths=(0.0, 1.0)), t).generate();"
        "print(json.dumps(d))"
    )
    # Two fresh interpreters (each pays transformers' import) against this process: determinism, not order.
    procs = [
        subprocess.Popen([sys.executable, "-c", code, v], stdout=subprocess.PIPE, text=True)
        for v in ("simple", "multisubkey")
    ]
    runs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    here = KVGenerator(KVSpec(variant="simple", num_samples=4, lengths=(900,), depths=(0.0, 1.0)), tok).generate()
    assert runs[0].strip() == json.dumps(here)
    assert runs[0] != runs[1]
    docs = json.loads(runs[0])
    assert len({d["doc_sha256"] for d in docs}) == len(docs)


def test_different_seeds_differ():
    a = KVGenerator(KVSpec(num_samples=3, lengths=None, num_dicts=10, seed=1)).generate()
    b = KVGenerator(KVSpec(num_samples=3, lengths=None, num_dicts=10, seed=2)).generate()
    assert {d["doc_sha256"] for d in a}.isdisjoint({d["doc_sha256"] for d in b})


def test_bad_specs_fail_with_a_fix():
    with pytest.raises(NeedlesError, match="tokenizer"):
        KVGenerator(KVSpec(lengths=(1024,)))
    with pytest.raises(NeedlesError, match="depths"):
        KVGenerator(KVSpec(lengths=None, depths=(1.5,)))
    with pytest.raises(NeedlesError, match="common_subkeys"):
        KVGenerator(KVSpec(variant="multisubkey", lengths=None, subkeys=2, common_subkeys=2))


def test_target_too_small(tok):
    with pytest.raises(NeedlesError, match="cannot hold"):
        KVGenerator(KVSpec(num_samples=1, lengths=(64,), variant="multisubkey"), tok).generate()
