"""Which downloaded files a task reads: lets a caller check, in seconds and before anything slow runs, that
every task of a suite can get its data (a mirror, the cache or a verified download).

Synthetic tasks (``kv_retrieval*``, ``needles_passkey``) need nothing; ``needles_long_ppl`` reads the held-out book
part unless it runs on the user's files or a PG19 mirror; ``musique`` reads the MuSiQue dev file and
``summhay_citation`` the haystacks of ``summhay_haystacks``; every ``synth_mdqa`` cell reads the NQ-Open oracle file
(real passages, and the answers invented values must not collide with). Unknown tasks (lm-eval's own,
groups such as ``needles_paper``) are not checked here: lm-eval reports their data problems itself.
"""

from __future__ import annotations

from harness_ext.core.metadata import truthy
from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_DEV, SUMMHAY, summhay_path
from harness_ext.data.sources import (
    FLENQA,
    FLENQA_FILE,
    LOST_IN_THE_MIDDLE,
    RETRIEVAL_HEAD,
    RETRIEVAL_HEAD_HAYSTACK,
    RETRIEVAL_HEAD_NEEDLES,
    Source,
)
from harness_ext.tasklib.mdqa import ORACLE_FILE
from harness_ext.tasklib.mdqa import data_files as mdqa_files


def data_needs(task: str, metadata: dict) -> list[tuple[Source, str]]:
    """(source, file) pairs ``task`` reads with this ``--metadata``; empty when it reads none we know of."""
    if task.startswith("niah"):
        return [(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES)] + [(RETRIEVAL_HEAD, rel) for rel in RETRIEVAL_HEAD_HAYSTACK]
    if task.startswith("needles_long_ppl"):
        from harness_ext.tasklib.long_ppl import spec_from_metadata as long_ppl_spec
        from harness_ext.tasklib.long_ppl_text import BOOK_PART

        return [(RETRIEVAL_HEAD, BOOK_PART)] if long_ppl_spec(task, metadata).text == "book" else []
    if task.startswith("flenqa"):
        return [(FLENQA, FLENQA_FILE)]
    if task.startswith("synth_mdqa"):
        needs = [(LOST_IN_THE_MIDDLE, ORACLE_FILE)]
        if truthy(metadata.get("synth_reference_needles", False)):
            needs.append((RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES))
        return needs
    if task.startswith("mdqa"):
        return [(LOST_IN_THE_MIDDLE, rel) for rel in mdqa_files(task, metadata)]
    if task == "musique":
        return [(MUSIQUE, MUSIQUE_DEV)]
    if task == "summhay_citation":
        from harness_ext.tasklib.summhay import spec_from_metadata

        return [(SUMMHAY, summhay_path(h)) for h in spec_from_metadata(metadata).haystacks]
    return []
