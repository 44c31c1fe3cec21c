"""The synthetic MDQA cells as retrieval-head probes: ``needles heads --probes synth_mdqa:CELL``.

The probes are the documents of the lm-eval task ``synth_mdqa_<cell>`` (eval split), built by the same
generator and cache (:func:`harness_ext.tasklib.synth_mdqa.generate`) from the same ``--metadata`` keys
(``synth_*`` and the data mirrors; ``needles heads`` takes them from ``--mdqa-metadata``). Sample ``i``
does not depend on the sample count, so the probes are the first :data:`PROBE_DEFAULTS` samples of the
task unless ``synth_num_samples`` says otherwise. The needle is the answer inside the gold document,
found as for MDQA (:func:`harness_ext.heads.probes.mdqa_needle`); success is ``best_subspan_em``.

This module imports the synthetic family only when probes are built or listed: it loads ``datasets``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from harness_ext.heads.prompts import Probe

SYNTH_PREFIX = "synth_mdqa:"
PROBE_DEFAULTS = {"synth_num_samples": 4}  # x the task's 3 gold positions: 12 probes per cell


def synth_probe_names() -> list[str]:
    """``synth_mdqa:CELL`` for every cell of the grid (the real-data baseline included)."""
    from harness_ext.tasklib.synth_mdqa import CELLS

    return [SYNTH_PREFIX + cell for cell in CELLS]


def is_synth_probe(name: str) -> bool:
    return name.startswith(SYNTH_PREFIX)


class ProbeChoices:
    """argparse choices of ``--probes``: fixed families, then the synth cells, listed only when asked
    (parsing a fixed family, or ``needles --help``, never imports the synthetic family)."""

    def __init__(self, fixed: Iterable[str]):
        self.fixed = tuple(fixed)

    def __contains__(self, value: object) -> bool:
        return value in self.fixed or (isinstance(value, str) and value in synth_probe_names())

    def __iter__(self) -> Iterator[str]:
        return iter((*self.fixed, *synth_probe_names()))


def synth_docs(cell: str, metadata: dict) -> list[dict]:
    """The documents of the task ``synth_mdqa_<cell>`` for ``metadata`` (its ``--metadata``), probe defaults under it."""
    from harness_ext.tasklib.synth_mdqa import generate, spec_from_metadata

    metadata = {**PROBE_DEFAULTS, **metadata}
    rows, _info = generate(spec_from_metadata(cell, metadata), metadata)
    return rows


def check_synth_metadata(names: Iterable[str], metadata: dict) -> None:
    """Refuse bad ``synth_*`` metadata of the requested ``synth_mdqa:CELL`` probes before any model is loaded."""
    from harness_ext.tasklib.synth_mdqa import spec_from_metadata

    for name in names:
        if is_synth_probe(name):
            spec_from_metadata(name.removeprefix(SYNTH_PREFIX), {**PROBE_DEFAULTS, **metadata})


def synth_probe(tokenizer: PreTrainedTokenizerBase, doc: dict, chat: bool, index: int = 0) -> Probe:
    """A synthetic MDQA document as a probe: the answer span inside the gold document is the needle."""
    from harness_ext.heads.probes import mdqa_needle
    from harness_ext.heads.prompts import Probe, format_input

    prompt = doc["prompt"]
    lo, hi = mdqa_needle(doc, prompt)
    text, offset = format_input(tokenizer, prompt, None, chat)
    cell, pos = doc["cell"], doc["gold_position"]
    return Probe(
        probe_id=f"synth_mdqa/{cell}/s{doc.get('sample', index)}/len{doc.get('target_tokens')}/pos{pos}",
        family=SYNTH_PREFIX + cell,
        text=text,
        needle=(offset + lo, offset + hi),
        answer=" | ".join(doc["answers"]),
        doc=doc,
        meta={
            "cell": cell,
            "gold_position": pos,
            "num_documents": doc.get("num_documents"),
            "length": doc.get("target_tokens"),
            "needle_is_answer": prompt[lo:hi].lower() in (a.lower() for a in doc["answers"]),
        },
    )


def synth_probes(tokenizer: PreTrainedTokenizerBase, cell: str, metadata: dict, chat: bool) -> list[Probe]:
    """Every probe of one cell: :func:`synth_docs` as :func:`synth_probe`."""
    return [synth_probe(tokenizer, d, chat, i) for i, d in enumerate(synth_docs(cell, metadata))]
