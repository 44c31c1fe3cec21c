"""The synthetic KV-retrieval task family: datasets from ``--metadata`` (cached, hashed) and reply scoring."""

from __future__ import annotations

import re

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import tokenizer_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256, file_sha256
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.kv_generator import GENERATOR_VERSION, KVGenerator, KVSpec
from harness_ext.tasklib.metadata_keys import FAMILY_KEYS, check_family_metadata

# Metadata keys a user may set with --metadata (JSON); lm-eval's own keys pass, anything else is refused.
_SPEC_KEYS = FAMILY_KEYS["kv_retrieval"]


def _as_tuple(value, name: str, cast=int):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value]
    try:
        return tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise NeedlesError(
            f"--metadata {name}={value!r} is not a list of numbers", fix=f'e.g. "{name}": [1024, 2048]'
        ) from None


def spec_from_metadata(variant: str, answer_template: bool, metadata: dict) -> KVSpec:
    kwargs: dict = {"variant": variant, "answer_template": answer_template}
    check_family_metadata("kv_retrieval", metadata)
    for key in sorted(_SPEC_KEYS):
        if key not in metadata:
            continue
        value = metadata[key]
        if key == "lengths":
            value = _as_tuple(value, key)
        elif key == "depths":
            value = _as_tuple(value, key, float)
        elif key in {"dict_size_range", "key_digits", "value_digits"}:
            value = _as_tuple(value, key)
            if value is not None and len(value) == 1:
                value = (value[0], value[0])
        elif key != "prompt_template":
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise NeedlesError(f"--metadata {key}={value!r} is not an integer", fix=f'e.g. "{key}": 10') from None
        kwargs[key] = value
    if metadata.get("lengths", 0) in (None, [], "none") or "num_dicts" in metadata:
        kwargs["lengths"] = None  # an explicit dictionary count replaces token targets
    return KVSpec(**kwargs)


def kv_dataset(variant: str, answer_template: bool, metadata: dict) -> dict[str, datasets.Dataset]:
    spec = spec_from_metadata(variant, answer_template, metadata)
    spec.validate()
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": spec.to_json(),
        "tokenizer": tokenizer_fingerprint(metadata) if spec.lengths is not None else None,
        "template": file_sha256(spec.prompt_template) if spec.prompt_template else None,
    }

    def build() -> list[dict]:
        tok = tokenizer_from_metadata(metadata) if spec.lengths is not None else None
        return KVGenerator(spec, tok).generate()

    rows, path, _hit = cached_rows("kv", payload, build)
    ds = datasets.Dataset.from_list(rows, split=datasets.Split.TEST)
    out = datasets.DatasetDict({"test": ds})
    out.needles_info = {"needles_data_sha256": dataset_sha256(rows), "needles_data_cache": str(path)}
    return out


# ---------------------------------------------------------------------------------- scoring
_TEMPLATE_VALUE = re.compile(r"value of (?:the )?key\b[^\n]*?\bis\s*:?\s*\(?(\d+)", re.IGNORECASE)
_DICT_NAME = re.compile(r"Dictionary\s*\[?\s*(\d+)", re.IGNORECASE)
_PAIR_VALUE = re.compile(r"\d\)?\s*:\s*(\d+)")
_INT = re.compile(r"(?<![\d.])\d+(?![\d.])")


def parse_reply(reply: str, gold_key: str) -> tuple[str | None, str | None]:
    """(value, dictionary) the reply commits to: its *first* candidate, never any later match.

    Order: the answer-template sentence ("value of key K is V"); a ``gold_key: value`` pair in
    the first dictionary the reply mentions (a model that answers by quoting the gold
    dictionary); the first ``key: value`` pair; the first integer that is neither a gold (sub)key
    nor a dictionary name. Only the first candidate counts, so a reply that copies the context
    gets no credit for the gold value appearing somewhere inside it.
    """
    text = reply.strip()
    names = list(_DICT_NAME.finditer(text))
    dict_name = names[0].group(1) if names else None
    m = _TEMPLATE_VALUE.search(text)
    if m:
        return m.group(1), dict_name
    key_parts = [k.strip() for k in gold_key.split(",")]
    first_dict = text[: names[1].start()] if len(names) > 1 else text
    gold_pair = re.search(r"(?<!\d)" + r"\W+".join(map(re.escape, key_parts)) + r"\)?\s*:\s*(\d+)", first_dict)
    if gold_pair:
        return gold_pair.group(1), dict_name
    any_pair = _PAIR_VALUE.search(text)
    if any_pair:
        return any_pair.group(1), dict_name
    name_spans = [mm.span(1) for mm in names]
    for mm in _INT.finditer(text):
        if mm.group(0) in key_parts or any(a <= mm.start() < b for a, b in name_spans):
            continue
        return mm.group(0), dict_name
    return None, dict_name


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    value, dict_name = parse_reply(results[0], doc["gold_key"])
    scores = {
        "value_acc": float(value == doc["gold_value"]),
        "dict_acc": float(dict_name == str(doc["gold_dict"])),
    }
    scores["both_acc"] = scores["value_acc"] * scores["dict_acc"]
    suffixes = []
    if doc.get("target_tokens") is not None:
        suffixes.append(key_suffix("length", doc["target_tokens"]))
    if doc.get("depth") is not None:
        suffixes.append(key_suffix("depth", doc["depth"]))
    return with_breakdowns(scores, suffixes)
