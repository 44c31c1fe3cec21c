"""The ``passkey`` training family: passkey documents (:mod:`harness_ext.tasklib.passkey`, the generator of the
``needles_passkey`` task) drawn from a seed the evaluation does not use.

``data: {family: passkey, lengths: [...], depths: [...], num_samples: N, seed: S}``: every sample at every length
and depth, exact token counts in the trained model's tokens, as the task renders them. The default seed is
:data:`TRAIN_SEED`, not the task's 0, so the keys and documents differ; the recipe still checks every training
document's hash against the evaluation's (harness_ext.finetune.leakage). With ``loss_on: all`` the loss covers the
whole long document (filler, key line, question and answer): every position of the window is trained under the
extension's RoPE, as the context-extension papers train on long text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness_ext.core.errors import NeedlesError

PASSKEY_FAMILY = "passkey"
TRAIN_SEED = 1  # needles_passkey scores seed 0 (kv_tasks/passkey/needles_passkey.yaml)
TRAIN_NUM_SAMPLES = 20
KEYS = ("lengths", "depths", "num_samples", "seed")


@dataclass
class PasskeyTrainSpec:
    """The training set of the passkey family: its grid (lengths x depths x samples, seed)."""

    grid: Any  # harness_ext.tasklib.passkey.PasskeySpec
    family: str = PASSKEY_FAMILY

    @property
    def seed(self) -> int:
        return self.grid.seed

    def to_json(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self.grid)}

    def manifest_fields(self) -> dict:
        from harness_ext.tasklib.passkey import FILLER, GENERATOR_VERSION

        return {"family": self.family, "generator": GENERATOR_VERSION, "filler": FILLER}

    def documents(self) -> int:
        """Documents per epoch: every sample at every length and depth."""
        return self.grid.num_samples * len(self.grid.lengths) * len(self.grid.depths)


def passkey_train_spec(data: dict) -> PasskeyTrainSpec:
    """The validated spec of ``data: {family: passkey, ...}`` (unknown keys refused, bounds as the task's)."""
    from harness_ext.tasklib.niah import grid_from_metadata
    from harness_ext.tasklib.passkey import PasskeySpec

    unknown = sorted(set(data) - set(KEYS) - {"family"})
    if unknown:
        raise NeedlesError(
            f"data key(s) {unknown} do not apply to the passkey family", fix=f"use keys among {list(KEYS)}"
        )
    given = {f"passkey_{k}": v for k, v in data.items() if k in KEYS and v is not None}
    kw = {"num_samples": TRAIN_NUM_SAMPLES, "seed": TRAIN_SEED, **grid_from_metadata(PASSKEY_FAMILY, given)}
    return PasskeyTrainSpec(PasskeySpec(**kw))


def passkey_train_docs(spec: PasskeyTrainSpec, tokenizer: Any) -> list[dict]:
    """The training rows: the task's rows of this grid, each with ``prompt`` (the user turn), ``target`` (the
    assistant turn: the task's ``gen_prefix`` then the key, as lm-eval joins them) and ``doc_sha256``."""
    from harness_ext.tasklib.passkey import PasskeyGenerator, filler_stream

    rows = PasskeyGenerator(spec.grid, filler_stream(tokenizer), tokenizer).generate()
    return [{**row, "target": f"{row['answer_prefix']} {row['target']}"} for row in rows]
