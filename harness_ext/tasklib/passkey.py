"""The passkey retrieval family (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler text.

The test of Landmark Attention, later used by Position Interpolation, YaRN and LongLoRA to show that an
extended model still reads every position: the task description, filler sentences with the line "The pass key
is K. Remember it. K is the pass key." somewhere inside, and "What is the pass key? The pass key is". The last
words, "The pass key is", begin the reply: the row's ``prompt`` ends at the question and the task passes the
cue as lm-eval's ``gen_prefix``, so with ``--apply_chat_template`` they open the assistant turn (in the user turn
a chat model reads them as a sentence to complete about pass keys in general), and without a chat template the
prompt is ``prompt + " " + cue``, the text of the reference, whose token count is the row's exact length.

Rows are built by the NIAH machinery (:class:`~harness_ext.tasklib.niah_generator.NiahGenerator`): the filler
is a cyclic piece stream, a sample's window grows from the same start at every length, the prompt fits each
target length at every depth in the evaluated model's tokens (exact counts; one more word would not fit), and
the key line goes in at the sentence boundary nearest the requested depth, the same window and key at every
depth (paired). Sample ``i`` hides the key ``default_rng([seed, 11, i]).integers(10000, 100000)`` (PCG64), so
equal metadata and tokenizer give byte-identical rows on every machine.

Score: ``passkey_acc`` is 1 when the first run of ASCII digits in the reply equals the key, else 0 (a reply
without a number, or whose first number is another, fails), with ``_len<L>``, ``_depth<D>`` and
``_len<L>_depth<D>`` breakdowns.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

import datasets
import numpy as np

from harness_ext.core.paths import templates_dir
from harness_ext.core.tokenizers import required_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256, file_sha256
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.niah import grid_from_metadata
from harness_ext.tasklib.niah_generator import NiahGenerator
from harness_ext.tasklib.niah_haystack import GridSpec, Needle, NiahSpec, PieceStream, piece_stream

GENERATOR_VERSION = 2
TEMPLATE = "passkey/passkey.jinja"
# Mohtashami & Jaggi's filler, question and key line (github.com/epfml/landmark-attention, run_test.py).
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ANSWER_PREFIX = "The pass key is"  # lm-eval's gen_prefix (kv_tasks/passkey/needles_passkey.yaml)
QUESTION = "What is the pass key? " + ANSWER_PREFIX  # as the reference renders it; the fit counts all of it
KEY_RANGE = (10000, 100000)  # 5-digit keys, as InfiniteBench's passkey task
METRIC = "passkey_acc"
_FIRST_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class PasskeySpec(GridSpec):
    """Everything of the metadata that determines the rows (besides the tokenizer): the grid alone."""


def spec_from_metadata(task: str, metadata: dict) -> PasskeySpec:
    """The validated spec; unknown keys get ``did you mean``, wrong types and ranges a clear error."""
    check_family_metadata("passkey", metadata, task)
    return PasskeySpec(**grid_from_metadata("passkey", metadata))


def passkey(seed: int, sample: int) -> int:
    """The key of one sample: its own PCG64 stream, so a sample keeps its key when num_samples changes."""
    return int(np.random.default_rng([seed, 11, sample]).integers(*KEY_RANGE))


def key_needle(key: int) -> Needle:
    return Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", QUESTION, str(key))


class PasskeyGenerator(NiahGenerator):
    """NIAH's window fit and depth placement over the filler stream; sample ``i`` hides key ``i``."""

    def __init__(self, spec: PasskeySpec, stream: PieceStream, tokenizer: object) -> None:
        keys = [key_needle(passkey(spec.seed, i)) for i in range(spec.num_samples)]
        niah = NiahSpec(spec.lengths, spec.depths, spec.num_samples, spec.seed, "filler", prompt_template=TEMPLATE)
        super().__init__(niah, keys, stream, tokenizer)
        self.needles = keys  # in sample order (NIAH shuffles its needles; here every sample has its own key)

    def _doc(self, i, needle: Needle, length, depth, start, k, window, j, cum, prompt, n_tokens) -> dict:
        base = super()._doc(i, needle, length, depth, start, k, window, j, cum, prompt, n_tokens)
        doc = {
            "sample": i,
            "passkey": needle.real_needle,
            "target_tokens": length,
            "depth": depth,
            "needle_depth": base["needle_depth"],
            "n_tokens": n_tokens,
            "window_start": start,
            "window_pieces": k,
            "prompt": user_turn(prompt),
            "answer_prefix": ANSWER_PREFIX,
            "target": needle.real_needle,
        }
        doc["doc_sha256"] = hashlib.sha256(base["doc_sha256"].encode()).hexdigest()
        return doc


def user_turn(prompt: str) -> str:
    """The fitted prompt without the reply's cue: what lm-eval puts before ``gen_prefix``."""
    cue = " " + ANSWER_PREFIX
    if not prompt.endswith(cue):
        raise ValueError(f"a passkey prompt must end with {cue!r}: the template and QUESTION disagree")
    return prompt[: -len(cue)]


def plain_prompt(doc: dict) -> str:
    """The text a model without a chat template is given (lm-eval: ``prompt``, target_delimiter, ``gen_prefix``)."""
    return f"{doc['prompt']} {doc['answer_prefix']}"


def filler_stream(tokenizer: object) -> PieceStream:
    # The leading space: where the cyclic stream wraps, "again." and "The" stay two sentences.
    return piece_stream(" " + FILLER, tokenizer)


def passkey_dataset(task: str, metadata: dict) -> datasets.DatasetDict:
    """The passkey rows (cached) and the facts results must carry (``needles_info``)."""
    spec = spec_from_metadata(task, metadata)
    fingerprint = required_fingerprint(task, metadata)
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "filler": FILLER,
        "tokenizer": fingerprint,
        "template": file_sha256(templates_dir() / TEMPLATE),
    }

    def build() -> list[dict]:
        tok = tokenizer_from_metadata(metadata)
        return PasskeyGenerator(spec, filler_stream(tok), tok).generate()

    rows, path, _hit = cached_rows("passkey", payload, build)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": str(path),
        "needles_data_official": True,
        "needles_data_label": "synthetic passkey (Mohtashami & Jaggi 2023 filler and key line)",
        "needles_data_files": {},
        "needles_data_origin": ["generated"],
        "needles_alias_marks": [],
    }
    return out


# ---------------------------------------------------------------------------------- scoring
def passkey_match(key: str, reply: str) -> float:
    """1.0 when the first run of ASCII digits in ``reply`` is ``key`` (digit for digit), else 0.0."""
    found = _FIRST_NUMBER.search(reply)
    return float(found is not None and found.group(0) == key)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``passkey_acc`` overall and per length, depth and length x depth cell."""
    scores = {METRIC: passkey_match(doc["target"], results[0])}
    return with_breakdowns(scores, [key_suffix("length", doc["target_tokens"]), key_suffix("depth", doc["depth"])])
