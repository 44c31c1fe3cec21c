"""A FIXTURE mirror in the official MDQA file format, built from the real oracle file.

This is test data, not Lost in the Middle: the official distractors are the top passages a
retriever returned for each question; here they are gold passages of *other* questions that
contain none of this question's answers (SQuAD-normalised substring test), drawn with a seeded
RNG. The layout and JSON schema are the official ones, so the tasks run on it unchanged; the
folder carries a ``NEEDLES_FIXTURE.json`` marker and its files fail the official checksums, so a
task accepts it only with ``allow_unofficial_data`` and marks every result computed on it.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import FIXTURE_MARKER, LOST_IN_THE_MIDDLE, file_sha256
from harness_ext.tasklib.mdqa import OFFICIAL_GOLD_INDICES, ORACLE_FILE, official_path
from harness_ext.tasklib.metrics import squad_normalize

FIXTURE_VERSION = 1
LABEL = "MDQA FIXTURE (distractors = other questions' gold passages; not the official data)"


def read_oracle(path: Path) -> list[dict]:
    """The rows of an NQ-Open oracle file (``nq-open-oracle.jsonl.gz``); a damaged or wrong file is a NeedlesError."""
    path = Path(path)
    fix = "pass the Lost-in-the-Middle nq-open-oracle.jsonl.gz (or omit --oracle to fetch the verified file)"
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise NeedlesError(f"oracle file {path} {problem}", fix=fix)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeedlesError(f"oracle file {path} is not a readable gzipped JSONL file ({exc})", fix=fix) from None
    if not rows or not all(isinstance(r, dict) and {"question", "answers", "ctxs"} <= r.keys() for r in rows):
        raise NeedlesError(f"oracle file {path} has no rows with question, answers and ctxs", fix=fix)
    return rows


def draw_distractors(rows: list[dict], count: int, seed: int) -> list[list[int]]:
    """For each question, ``count`` indices of other questions whose gold passage has none of its answers.

    "Has none": no normalised answer occurs as a whole-word sequence in the passage's title + text.
    """
    # Whole-word match on normalised text (same test as harness_ext.tasklib.metrics.contains_answer, precomputed).
    passages = [f" {squad_normalize(r['ctxs'][0]['title'] + ' ' + r['ctxs'][0]['text'])} " for r in rows]
    texts = [r["ctxs"][0]["text"] for r in rows]
    out = []
    for i, row in enumerate(rows):
        answers = [f" {a} " for a in (squad_normalize(x) for x in row["answers"]) if a]
        rng = random.Random(f"{seed}:{i}")  # per question: one question's draw does not shift another's
        picked: list[int] = []
        seen_texts = {texts[i]}
        for _ in range(200 * count):
            j = rng.randrange(len(rows))
            if texts[j] in seen_texts or any(a in passages[j] for a in answers):
                continue
            picked.append(j)
            seen_texts.add(texts[j])
            if len(picked) == count:
                break
        if len(picked) < count:
            raise NeedlesError(
                f"question {i} ({row['question']!r}): found only {len(picked)} answer-free passages",
                fix="use fewer documents",
            )
        out.append(picked)
    return out


def _distractor(rows: list[dict], j: int, rank: int) -> dict:
    gold = rows[j]["ctxs"][0]
    return {
        "id": f"fixture-{j}",
        "title": gold["title"],
        "text": gold["text"],
        "score": None,
        "hasanswer": False,
        "original_retrieval_index": rank,
        "isgold": False,
    }


def _write_gz(path: Path, rows: list[dict]) -> None:
    """Deterministic gzip (mtime 0), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            for row in rows:
                gz.write((json.dumps(row) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_fixture(
    oracle: Path,
    out: Path,
    seed: int = 0,
    settings: tuple[int, ...] = (20,),
    num_questions: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the fixture mirror to ``out``; returns what the marker file records."""
    if seed < 0:
        raise NeedlesError(f"seed {seed} is negative", fix="use a seed of 0 or more (--seed)")
    if num_questions is not None and num_questions < 1:
        raise NeedlesError(
            f"num_questions {num_questions} is not positive", fix="keep at least 1 question (--num-questions)"
        )
    for n in settings:
        if n not in OFFICIAL_GOLD_INDICES:
            raise NeedlesError(f"{n} documents is not an official setting", fix=f"use {sorted(OFFICIAL_GOLD_INDICES)}")
    rows = read_oracle(oracle)
    oracle_official = file_sha256(oracle) == LOST_IN_THE_MIDDLE.files[ORACLE_FILE].sha256
    if num_questions is not None:
        rows = rows[:num_questions]
    picks = draw_distractors(rows, max(settings) - 1, seed)
    files = {}
    for n in settings:
        for gi in OFFICIAL_GOLD_INDICES[n]:
            rel = official_path(n, gi)
            if progress:
                print(f"[needles] fixture: writing {rel}", file=sys.stderr)
            data = []
            for row, pick in zip(rows, picks, strict=True):
                ctxs = [_distractor(rows, j, rank) for rank, j in enumerate(pick[: n - 1])]
                ctxs.insert(gi, dict(row["ctxs"][0], hasanswer=True, isgold=True))
                data.append(
                    {
                        "question": row["question"],
                        "answers": row["answers"],
                        "ctxs": ctxs,
                        "nq_annotated_gold": row.get("nq_annotated_gold"),
                    }
                )
            _write_gz(out / rel, data)
            files[rel] = file_sha256(out / rel)
    # Baselines read the oracle file: the official bytes when all questions are kept.
    if oracle_official and num_questions is None:
        (out / ORACLE_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(oracle, out / ORACLE_FILE)
    else:
        _write_gz(out / ORACLE_FILE, rows)
    files[ORACLE_FILE] = file_sha256(out / ORACLE_FILE)
    marker = {
        "kind": "fixture",
        "label": LABEL,
        "fixture_version": FIXTURE_VERSION,
        "seed": seed,
        "settings": list(settings),
        "num_questions": len(rows),
        "source_oracle_sha256": file_sha256(oracle),
        "built_by": "needles data mdqa-fixture",
        "files": files,
    }
    (out / FIXTURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    (out / "README.txt").write_text(
        "THIS IS A TEST FIXTURE, NOT THE LOST-IN-THE-MIDDLE DATA.\n"
        "Distractors are gold passages of other NQ-open questions (answer-free), not retrieved passages.\n"
        "Use it only with allow_unofficial_data; results on it are marked NON-OFFICIAL.\n",
        encoding="utf-8",
    )
    return marker
