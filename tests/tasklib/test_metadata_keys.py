"""Every task family refuses a misspelt or mistyped --metadata key, naming the closest valid key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import LM_EVAL_KEYS, check_keys, model_arg_names
from harness_ext.tasklib.flenqa import flenqa_dataset
from harness_ext.tasklib.kv import kv_dataset
from harness_ext.tasklib.mdqa import mdqa_dataset
from harness_ext.tasklib.metadata_keys import FAMILY_KEYS, check_family_metadata


@pytest.mark.parametrize(
    "family,typo,meant",
    [
        ("kv_retrieval", "lenghts", "lengths"),
        ("kv_retrieval", "num_sample", "num_samples"),
        ("kv_retrieval", "dpeths", "depths"),
        ("mdqa", "mdqa_num_question", "mdqa_num_questions"),
        ("mdqa", "mdqa_postions", "mdqa_positions"),
        ("flenqa", "flenqa_ctx_size", "flenqa_ctx_sizes"),
        ("flenqa", "flenqa_dispersion", "flenqa_dispersions"),
    ],
)
def test_typo_is_refused_with_the_closest_key(family, typo, meant):
    with pytest.raises(NeedlesError, match=f'did you mean "{meant}"') as err:
        check_family_metadata(family, {typo: 1})
    assert repr(typo) in err.value.problem


@pytest.mark.parametrize("family", sorted(FAMILY_KEYS))
def test_own_other_family_and_lm_eval_keys_pass(family):
    every_key = {k: 1 for keys in FAMILY_KEYS.values() for k in keys}
    check_family_metadata(family, {**every_key, **dict.fromkeys(LM_EVAL_KEYS, 1)})


def test_unknown_family_key_far_from_any_is_refused_without_a_guess():
    with pytest.raises(NeedlesError) as err:
        check_keys("kv_retrieval", {"mdqa_zzzzzzzz": 1}, own=FAMILY_KEYS["kv_retrieval"])
    assert "did you mean" not in (err.value.fix or "") and "lengths" in err.value.fix


def test_model_arguments_the_backend_forwards_pass_but_typos_do_not():
    """lm-eval merges --model_args into metadata and HFLM forwards unknown ones to from_pretrained."""
    import lm_eval.models.huggingface  # noqa: F401

    check_family_metadata("mdqa", {"attn_implementation": "sdpa", "device_map": "auto"})
    with pytest.raises(NeedlesError, match='did you mean "mdqa_positions"'):
        check_family_metadata("mdqa", {"attn_implementation": "sdpa", "mdqa_postions": [1]})


def test_loaded_model_backends_contribute_their_arguments():
    import lm_eval.models.huggingface  # noqa: F401  (a run imports its backend before building tasks)

    names = model_arg_names()
    assert {"pretrained", "backend", "max_length"} <= names
    check_family_metadata("kv_retrieval", {"pretrained": "x", "backend": "causal"})


def test_dataset_functions_check_before_any_work():
    with pytest.raises(NeedlesError, match='did you mean "lengths"'):
        kv_dataset("simple", False, {"lenghts": [512]})
    with pytest.raises(NeedlesError, match='did you mean "mdqa_num_questions"'):
        mdqa_dataset(mdqa_num_question=5)
    with pytest.raises(NeedlesError, match='did you mean "flenqa_order_seed"'):
        flenqa_dataset("pir", flenqa_order_sed=1)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kv_dataset("simple", False, {"num_samples": "many"}), "num_samples='many' is not an integer"),
        (lambda: kv_dataset("simple", False, {"lengths": ["x"]}), "lengths=.* is not a list of numbers"),
        (lambda: mdqa_dataset(mdqa_num_questions="all"), "is not an integer"),
        (lambda: mdqa_dataset(mdqa_num_questions=0), "must be at least 1"),
        (lambda: mdqa_dataset("sweep", mdqa_positions=["first"]), "not a list of integers"),
        (lambda: flenqa_dataset("pir", flenqa_order_seed="x"), "flenqa_order_seed='x' is not an integer"),
    ],
)
def test_wrong_types_and_ranges_fail_clearly(call, match):
    with pytest.raises(NeedlesError, match=match):
        call()


@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_lm_eval_cli_refuses_a_metadata_typo(tiny_llama_dir):
    """The user's view: `lm_eval --metadata '{"lenghts": [512]}'` stops with the fix, not a default-length run."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--tasks",
            "kv_retrieval_simple",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_llama_dir},dtype=float32",
            "--metadata",
            json.dumps({"lenghts": [512]}),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert 'did you mean "lengths"' in proc.stderr
    assert "Traceback" not in proc.stderr
