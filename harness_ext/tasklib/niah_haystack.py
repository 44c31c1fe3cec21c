"""NIAH data: needles (the reference's or the user's) and their split, the book haystack as a piece stream.

The lm-eval side (metadata validation, caching, scoring) is :mod:`harness_ext.tasklib.niah`; its
docstring describes the sampling design that :class:`~harness_ext.tasklib.niah_generator.NiahGenerator`
implements with these data.

The haystack is Wu et al.'s detection haystack (github.com/nightdessert/Retrieval_Head,
``haystack_for_detect/part{1,2,3}/p1.txt``). Each file is the JSON of a dataset-viewer page cut at
262,144 bytes, so it is not valid JSON. Two readings are offered (metadata ``niah_haystack``):

* ``text`` (default): the complete ``rows[].row.text`` fields, JSON-decoded, i.e. the book chapters
  as clean prose (real newlines and quotes); rows joined by a blank line, parts in order 1, 2, 3.
  A needle is a plain English sentence, so it is hidden among plain English sentences.
* ``raw``: the files' bytes as text, concatenated in order, which is what the reference detector
  feeds the model (JSON syntax, ``\\n`` escapes and the ``prompt``/``completion`` copies included).

Either stream repeats cyclically when a window is longer than the haystack, as the reference
concatenates its files again until the context is long enough.

The stream is cut into *pieces*: leading whitespace + one whitespace-free word. A window is a run of
consecutive pieces and starts at a sentence start; a needle goes in at a sentence boundary, i.e.
before a piece that starts with whitespace and follows a piece ending in ``.``, ``!`` or ``?``
(closing quotes and brackets allowed), as the reference backs its insertion point up to a period.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import (
    RETRIEVAL_HEAD,
    RETRIEVAL_HEAD_HAYSTACK,
    RETRIEVAL_HEAD_NEEDLES,
    Resolved,
    fetch,
)
from harness_ext.tasklib.breakdowns import format_depth
from harness_ext.tasklib.token_budget import count_pieces

DEFAULT_TEMPLATE = "niah/single.jinja"
HAYSTACK_MODES = ("text", "raw")
NEEDLE_FIELDS = ("needle", "question", "real_needle")
SPLITS = ("all", "train", "eval")
_SPLIT_SALT = "niah-split-v1"

_TEXT_FIELD = re.compile(r'"text":"((?:[^"\\]|\\.)*)"')  # a complete JSON string only (the cut row is dropped)
_PIECE = re.compile(r"\s*\S+")
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@dataclass(frozen=True)
class GridSpec:
    """A length x depth grid of samples (NIAH, passkey): each sample at every target length and depth."""

    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    num_samples: int = 6
    seed: int = 0


@dataclass(frozen=True)
class NiahSpec(GridSpec):
    """Everything of the metadata that determines the rows (besides data files and tokenizer)."""

    haystack: str = "text"
    needles: str | None = None
    exclude: tuple[str, ...] = ()  # needle keys (see niah_haystack.needle_key)
    split: str = "all"
    train_fraction: float = 0.5
    prompt_template: str | None = None


def depth_label(depth: float) -> str:
    return format_depth(depth)


# ---------------------------------------------------------------------------------- needles
@dataclass(frozen=True)
class Needle:
    needle: str  # the sentence inserted into the haystack
    question: str
    real_needle: str  # the answer span ROUGE is computed against


def needle_key(text: str) -> str:
    """The identity of a needle for splits and exclusions: its sentence, case- and whitespace-insensitive."""
    return " ".join(text.split()).lower()


def read_needles(path: str | Path, where: str) -> list[Needle]:
    """Needles from a JSONL file with the reference's fields (``needle``, ``question``, ``real_needle``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NeedlesError(f"{where}: needles file {path} does not exist", fix="give the path of a .jsonl file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NeedlesError(
                f"{where}: {path} line {lineno} is not JSON ({exc.msg})", fix="one object per line"
            ) from None
        missing = [f for f in NEEDLE_FIELDS if not isinstance(row, dict) or not str(row.get(f) or "").strip()]
        if missing:
            raise NeedlesError(
                f"{where}: {path} line {lineno} lacks {', '.join(missing)}",
                fix='each line needs non-empty "needle", "question" and "real_needle" strings (the reference format)',
            )
        out.append(Needle(*(str(row[f]).strip() for f in NEEDLE_FIELDS)))
    if not out:
        raise NeedlesError(f"{where}: {path} holds no needles", fix="add at least one needle line")
    return out


def split_of(needle: Needle, train_fraction: float) -> str:
    """``train`` or ``eval``: a fixed function of the needle sentence, the same on every machine and run."""
    h = int(hashlib.sha256(f"{_SPLIT_SALT}\0{needle_key(needle.needle)}".encode()).hexdigest()[:15], 16)
    return "train" if h / 16**15 < train_fraction else "eval"


def select_needles(
    needles: list[Needle], split: str, train_fraction: float, exclude: set[str], where: str
) -> list[Needle]:
    """The needles of ``split`` minus the excluded ones (by :func:`needle_key`); refuses an empty set."""
    kept = [
        n
        for n in needles
        if (split == "all" or split_of(n, train_fraction) == split) and needle_key(n.needle) not in exclude
    ]
    if not kept:
        raise NeedlesError(
            f"{where}: no needle is left after niah_split={split!r} and niah_exclude_needles "
            f"({len(needles)} needle(s) before)",
            fix="use more needles (niah_needles), another niah_train_fraction, or exclude fewer",
        )
    return kept


# ---------------------------------------------------------------------------------- haystack
def extract_text(raw: str) -> str:
    """The complete ``text`` fields of a (cut) dataset-viewer JSON page, decoded, joined by a blank line."""
    return "\n\n".join(json.loads(f'"{m.group(1)}"') for m in _TEXT_FIELD.finditer(raw))


def load_haystack(mode: str, metadata: dict) -> tuple[str, list[Resolved]]:
    """The haystack stream of ``mode`` and the verified files it was read from."""
    got = [fetch(RETRIEVAL_HEAD, rel, metadata) for rel in RETRIEVAL_HEAD_HAYSTACK]
    raws = [g.path.read_bytes().decode("utf-8", errors="replace") for g in got]  # a cut may split a character
    if mode == "raw":
        return "".join(raws), got
    # Leading blank line: where the stream repeats, the next copy starts a new paragraph.
    return "\n\n" + "\n\n".join(extract_text(r) for r in raws), got


def load_reference_needles(metadata: dict) -> tuple[list[Needle], Resolved]:
    got = fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, metadata)
    return read_needles(got.path, f"{RETRIEVAL_HEAD.label()}"), got


@dataclass
class PieceStream:
    """The haystack as pieces, their sentence boundaries, and token costs for one tokenizer.

    A piece's cost is its token count alone, computed on first use (a run touches a few windows,
    not the whole book); sums of costs only *estimate* a window, which is then tokenized in full.
    Costs are also kept by piece string: a book repeats its words, so a fresh window's pieces are
    mostly known already and only new strings go to the tokenizer (same numbers, fewer calls).
    """

    pieces: list[str]
    boundary: np.ndarray  # boundary[j]: a needle may go right before piece j
    starts: np.ndarray  # piece indices where a window may start (a sentence start)
    tokenizer: object
    cost: np.ndarray  # -1 until computed
    known: dict[str, int] = field(default_factory=dict)  # piece string -> its token count alone

    def __len__(self) -> int:
        return len(self.pieces)

    def cumulative(self, start: int, count: int) -> np.ndarray:
        """cum[k] = estimated tokens of the ``k`` pieces from ``start`` (cyclic), cum[0] = 0."""
        idx = (start + np.arange(count)) % len(self.pieces)
        todo = np.unique(idx[self.cost[idx] < 0])
        if len(todo):
            texts = [self.pieces[i] for i in todo]
            new = sorted({t for t in texts if t not in self.known})  # sorted: the same calls on every run
            if new:
                self.known.update(zip(new, count_pieces(self.tokenizer, new).tolist()))
            self.cost[todo] = [self.known[t] for t in texts]
        return np.concatenate([[0], np.cumsum(self.cost[idx])])

    def join(self, start: int, stop: int) -> str:
        """Pieces ``start``..``stop-1`` of the cyclic stream, verbatim."""
        n = len(self.pieces)
        if stop <= start:
            return ""
        out = []
        for copy in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start - copy * n, 0), min(stop - copy * n, n)
            out.append("".join(self.pieces[lo:hi]))
        return "".join(out)

    def boundaries(self, start: int, count: int) -> np.ndarray:
        """Offsets j in 1..count-1 of the window ``start``..``start+count`` before which a needle may go."""
        idx = (start + np.arange(1, count)) % len(self.pieces)
        return np.flatnonzero(self.boundary[idx]) + 1


def split_pieces(text: str) -> tuple[list[str], np.ndarray]:
    pieces = _PIECE.findall(text)
    if not pieces:
        raise NeedlesError("the NIAH haystack is empty", fix="check the haystack files (needles data verify niah)")
    ends = np.array([bool(_SENTENCE_END.search(p)) for p in pieces])
    spaced = np.array([p[:1].isspace() for p in pieces])
    boundary = np.zeros(len(pieces), dtype=bool)
    boundary[1:] = ends[:-1] & spaced[1:]
    boundary[0] = ends[-1] and spaced[0]  # the cyclic join: last piece of one copy, first of the next
    return pieces, boundary


@lru_cache(maxsize=4)
def piece_stream(text: str, tokenizer) -> PieceStream:
    """The piece stream of a haystack for a tokenizer (cached, so costs computed once are kept)."""
    pieces, boundary = split_pieces(text)
    starts = np.flatnonzero(boundary)
    if len(starts) == 0:
        raise NeedlesError("the NIAH haystack has no sentence boundary", fix="use a haystack of sentences")
    return PieceStream(pieces, boundary, starts, tokenizer, np.full(len(pieces), -1, dtype=np.int64))
