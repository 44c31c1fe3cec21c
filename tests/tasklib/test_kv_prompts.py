"""Rendered KV prompts are byte-identical to the reference implementation's texts."""

from __future__ import annotations

import ast
import re

import pytest

from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec

# Reference prompt files (edixiong/artificial-needles data-generation/prompts/dictionary/), as
# Python format strings, and the reference's dictionary rendering (str(dict) of 1-tuples, then
# "(" and ",)" removed). The placeholder spelling "disctionaries" is the reference's own.
REF_PROMPT = (
    "Do a task using the list of dictionaries below.\n\n{disctionaries}\n\nAbove is a list of dictionaries such "
    "that each key and value is an integer. Report the value of key {gold_key_str} and the dictionary it is in."
)
REF_PROMPT_TEMPLATE = (
    REF_PROMPT + " Answer in the following template:\nThe value of key {gold_key_str} is <fill-in-value> and it is "
    "in Dictionary [<fill-in-dictionary-name>]."
)
REF_ANSWER = "The value of key {gold_key} is {gold_value} and it is in Dictionary [{gold_dict_name}]."


def _reference_render(dicts: list[dict], gold_key: int, template: str) -> str:
    lines = []
    for i, d in enumerate(dicts):
        as_tuples = {(k,): v for k, v in d.items()}
        s = str(as_tuples).replace("(", "").replace(",)", "")
        lines.append(f"Dictionary [{i + 1}] {s}")
    gold_key_str = str((gold_key,)).replace("(", "").replace(",)", "")
    return template.format(gold_key_str=gold_key_str, disctionaries="\n".join(lines))


@pytest.mark.parametrize("answer_template,ref", [(False, REF_PROMPT), (True, REF_PROMPT_TEMPLATE)])
def test_simple_prompt_matches_reference_bytes(answer_template, ref):
    docs = KVGenerator(KVSpec(num_samples=5, lengths=None, num_dicts=85, answer_template=answer_template)).generate()
    for d in docs:
        dicts = [ast.literal_eval(m.group(1)) for m in re.finditer(r"^Dictionary \[\d+\] (\{.*\})$", d["prompt"], re.M)]
        assert len(dicts) == 85
        assert d["prompt"] == _reference_render(dicts, int(d["gold_key"]), ref)
        assert d["target"] == REF_ANSWER.format(
            gold_key=d["gold_key"], gold_value=d["gold_value"], gold_dict_name=d["gold_dict"]
        )
        assert not d["prompt"].endswith("\n")


def test_user_template_renders_sandboxed(tmp_path):
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }} {{ disctionaries }} {{ gold_key_str }}\n")
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        KVGenerator(KVSpec(num_samples=1, lengths=None, num_dicts=3, prompt_template=str(evil))).generate()

    ok = tmp_path / "ok.jinja"
    ok.write_text("Find {{ gold_key_str }}.\n{{ disctionaries }}\n")
    d = KVGenerator(KVSpec(num_samples=1, lengths=None, num_dicts=3, prompt_template=str(ok))).generate()[0]
    assert d["prompt"].startswith(f"Find {d['gold_key']}.\nDictionary [1] {{")
