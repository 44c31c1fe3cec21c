"""The ``--metadata`` keys of every task family, in one place, so each family can refuse a misspelt key.

One ``--metadata`` JSON serves every task of a run (``--tasks kv_retrieval,mdqa20``): a family accepts
its own keys, every other family's keys (they are meant for the other tasks) and lm-eval's.
"""

from __future__ import annotations

from collections.abc import Mapping

from harness_ext.core.metadata import check_keys

FAMILY_KEYS: dict[str, frozenset[str]] = {
    "kv_retrieval": frozenset(
        {
            "lengths",
            "depths",
            "num_samples",
            "seed",
            "num_dicts",
            "gold_dict_size",
            "dict_size_range",
            "key_digits",
            "value_digits",
            "subkeys",
            "common_subkeys",
            "prompt_template",
        }
    ),
    "mdqa": frozenset(
        {
            "mdqa_mirror",
            "mdqa_order_seed",
            "mdqa_num_questions",
            "mdqa_split",
            "mdqa_query_aware",
            "mdqa_positions",
            "mdqa_num_documents",
            "allow_unofficial_data",
        }
    ),
    "flenqa": frozenset(
        {
            "flenqa_mirror",
            "flenqa_ctx_sizes",
            "flenqa_padding_types",
            "flenqa_dispersions",
            "flenqa_order_seed",
            "allow_unofficial_data",
        }
    ),
    "niah": frozenset(
        {
            "niah_lengths",
            "niah_depths",
            "niah_num_samples",
            "niah_seed",
            "niah_haystack",
            "niah_needles",
            "niah_exclude_needles",
            "niah_split",
            "niah_train_fraction",
            "niah_prompt_template",
            "niah_mirror",
        }
    ),
    "passkey": frozenset({"passkey_lengths", "passkey_depths", "passkey_num_samples", "passkey_seed"}),
    "long_ppl": frozenset(
        {
            "long_ppl_contexts",
            "long_ppl_continuation",
            "long_ppl_num_docs",
            "long_ppl_text",
            "long_ppl_files",
            "long_ppl_pg19_mirror",
            "niah_mirror",  # the book text is a file of the NIAH data source
        }
    ),
    "musique": frozenset(
        {
            "musique_lengths",
            "musique_placements",
            "musique_num_questions",
            "musique_seed",
            "musique_mirror",
            "allow_unofficial_data",
        }
    ),
    "summhay": frozenset(
        {
            "summhay_lengths",
            "summhay_placements",
            "summhay_num_insights",
            "summhay_num_gold",
            "summhay_haystacks",
            "summhay_seed",
            "summhay_mirror",
            "allow_unofficial_data",
        }
    ),
    "synth_mdqa": frozenset(
        {
            "synth_num_documents",
            "synth_positions",
            "synth_num_samples",
            "synth_seed",
            "synth_lengths",
            "synth_facts_per_document",
            "synth_reference_needles",
            # the data the cells read: the MDQA oracle file and Wu et al.'s needles
            "mdqa_mirror",
            "niah_mirror",
            "allow_unofficial_data",
        }
    ),
}


def check_family_metadata(family: str, metadata: Mapping[str, object], task: str | None = None) -> None:
    """Refuse any key that is not ``family``'s, another family's or lm-eval's (with the closest valid name)."""
    others = frozenset().union(*(keys for name, keys in FAMILY_KEYS.items() if name != family))
    check_keys(task or family, metadata, own=FAMILY_KEYS[family], shared=others)
