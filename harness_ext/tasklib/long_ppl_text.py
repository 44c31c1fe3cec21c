"""The long texts the continuation-loss family reads: held-out book text, the user's files, or a PG19 mirror.

* ``book`` (default): the clean prose (``extract_text``) of :data:`BOOK_PART`, one part of Wu et al.'s
  retrieval-head haystack (pinned and verified like the NIAH data, mirror key ``niah_mirror``).
* ``files``: the user's UTF-8 text files (``long_ppl_files``), each one text, in the order given.
* ``pg19``: the test split of PG19 (Rae et al. 2020) from a local mirror: ``<mirror>/test/*.txt``, the layout of
  ``gs://deepmind-gutenberg/test/`` (100 books), read in file-name order. **Mirror only**: PG19 publishes no
  checksums and its bucket has no revision to pin, so nothing is downloaded; every file's SHA-256 goes into the
  results and the task alias is marked ``pg19 test, unpinned mirror``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.data.dataset_cache import file_sha256
from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK, fetch
from harness_ext.tasklib.niah_haystack import extract_text

# The held-out split of the book haystack: its last part. No training-data family of `needles finetune` reads
# any part (harness_ext.finetune.families: kv, synth_mdqa, musique, summhay are generated or from other data),
# and the heads probes build their own filler; the NIAH tasks read all three parts, but as context around a
# scored needle, never as text whose loss is measured. Fixing the last part as the loss split leaves parts 1-2
# to any training use of this book text and keeps part 3 out of it; the rule is this one constant.
BOOK_PART = RETRIEVAL_HEAD_HAYSTACK[2]
TEXT_CHOICES = ("book", "files", "pg19")
PG19_MIRROR_KEY = "long_ppl_pg19_mirror"
PG19_MIRROR_ENV = "NEEDLES_PG19_MIRROR"
PG19_SPLIT = "test"
PG19_FETCH_HINT = (
    "copy PG19's test split to a folder D (`gsutil -m cp 'gs://deepmind-gutenberg/test/*.txt' D/test/`, or the "
    'test/*.txt files of a PG19 copy) and pass --metadata \'{"long_ppl_pg19_mirror": "D"}\' or NEEDLES_PG19_MIRROR=D'
)


@dataclass(frozen=True)
class LongText:
    name: str  # what rows and results call it (relative path of a data file, or the user's path)
    text: str
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class TextSet:
    texts: list[LongText]
    official: bool  # pinned and verified (the book), or not (user files, an unpinned PG19 mirror)
    label: str
    origin: list[str]
    marks: list[str]  # alias marks: scores on other text are never shown under the plain task name


def _read(path: Path, where: str) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise NeedlesError(f"{where}: cannot read {path}: {exc.strerror}", fix="give a readable text file") from None
    except UnicodeDecodeError as exc:
        raise NeedlesError(
            f"{where}: {path} is not UTF-8 text (byte {exc.start})", fix="convert it to UTF-8 or leave it out"
        ) from None
    if not text.strip():
        raise NeedlesError(f"{where}: {path} holds no text", fix="leave out empty files")
    return text


def book_texts(metadata: dict) -> TextSet:
    got = fetch(RETRIEVAL_HEAD, BOOK_PART, metadata)
    text = extract_text(got.path.read_bytes().decode("utf-8", errors="replace"))  # a cut may split a character
    marks = [] if got.official else ["NON-OFFICIAL DATA"]
    return TextSet([LongText(got.relpath, text, got.sha256)], got.official, got.label, [got.origin], marks)


def file_texts(paths: tuple[str, ...]) -> TextSet:
    texts = []
    for value in paths:
        path = Path(value).expanduser()
        if not path.is_file():
            raise NeedlesError(f"--metadata long_ppl_files: {path} is not a file", fix="give paths of text files")
        texts.append(LongText(str(path.resolve()), _read(path, "long_ppl_files"), file_sha256(path)))
    n = len(texts)
    return TextSet(texts, False, "own text files", ["files"], [f"own text: {n} file{'s' if n > 1 else ''}"])


def pg19_texts(metadata: dict) -> TextSet:
    value = metadata.get(PG19_MIRROR_KEY) or os.environ.get(PG19_MIRROR_ENV)
    if not value:
        raise NeedlesError(
            "long_ppl_text 'pg19' reads a local mirror of PG19's test split; none is set", fix=PG19_FETCH_HINT
        )
    root = Path(str(value)).expanduser().resolve()
    files = sorted((root / PG19_SPLIT).glob("*.txt"))
    if not files:
        raise NeedlesError(f"the PG19 mirror {root} has no {PG19_SPLIT}/*.txt", fix=PG19_FETCH_HINT)
    texts = [LongText(f"{PG19_SPLIT}/{f.name}", _read(f, "PG19 mirror"), file_sha256(f)) for f in files]
    label = f"PG19 test split, unpinned mirror ({len(files)} books)"
    return TextSet(texts, False, label, ["mirror"], ["pg19 test, unpinned mirror"])


def load_texts(choice: str, files: tuple[str, ...], metadata: dict) -> TextSet:
    """The texts of ``choice`` (one of :data:`TEXT_CHOICES`)."""
    if choice == "files":
        return file_texts(files)
    if choice == "pg19":
        return pg19_texts(metadata)
    return book_texts(metadata)
