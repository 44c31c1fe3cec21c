"""Defaults of the retrieval-head commands that other layers need without loading a model or numpy: the
reference needles file and the MDQA probe setting (the `needles heads` flags and `needles study` share them)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_NEEDLES = "retrieval-head/needles.jsonl"
DEFAULT_MDQA = {"mdqa_num_documents": 10, "mdqa_positions": [1, 5, 10], "mdqa_num_questions": 4}


def shared_needles() -> Path:
    """The reference needles when --needles is not given: the copy under $NEEDLES_SHARED_DATA (or ../shared/data
    beside a clone) when there is one, else the niah task's data source (NEEDLES_NIAH_MIRROR, the cache, or a
    verified download from the pinned Retrieval_Head commit), so heads probes and the niah task read one file."""
    root = Path(os.environ.get("NEEDLES_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    if (root / DEFAULT_NEEDLES).is_file() or "NEEDLES_SHARED_DATA" in os.environ:
        return root / DEFAULT_NEEDLES
    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, fetch

    return Path(fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, {}).path)
