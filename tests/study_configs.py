"""The smallest `needles study` config the tests start from: two KV variants ("real", the reference, and "synth",
another data seed) of one training step each, one KV target, k 1, the hf backend."""

from __future__ import annotations

KV = "kv_retrieval_simple"


def kv_study(model: str, **changes: object) -> dict:
    """The config for ``model``; each of ``changes`` replaces a whole top-level key (or adds one)."""
    return {
        "name": "s",
        "model": model,
        "reference_variant": "real",
        "finetune": {"data": {"num_samples": 4, "num_dicts": 4, "lengths": None}, "max_steps": 1},
        "variants": [{"name": "real"}, {"name": "synth", "finetune": {"data": {"seed": 1}}}],
        "targets": [{"task": KV, "metric": "value_acc"}],
        "metadata": {"num_dicts": 4, "num_samples": 2, "lengths": None},
        "backend": "hf",
        "k": 1,
        **changes,
    }
