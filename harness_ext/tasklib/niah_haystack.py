"""NIAH data and rows: needles (the reference's or the user's) and their split, the book haystack, the generator.

The lm-eval side (metadata validation, caching, scoring) is :mod:`harness_ext.tasklib.niah`; its
docstring describes the sampling design that :class:`NiahGenerator` implements.

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.templating import load_template
from harness_ext.data.sources import (
    RETRIEVAL_HEAD,
    RETRIEVAL_HEAD_HAYSTACK,
    RETRIEVAL_HEAD_NEEDLES,
    Resolved,
    fetch,
)
from harness_ext.tasklib.breakdowns import format_depth
from harness_ext.tasklib.token_budget import count_plain, count_tokens

DEFAULT_TEMPLATE = "niah/single.jinja"
HAYSTACK_MODES = ("text", "raw")
NEEDLE_FIELDS = ("needle", "question", "real_needle")
SPLITS = ("all", "train", "eval")
_SPLIT_SALT = "niah-split-v1"

_TEXT_FIELD = re.compile(r'"text":"((?:[^"\\]|\\.)*)"')  # a complete JSON string only (the cut row is dropped)
_PIECE = re.compile(r"\s*\S+")
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@dataclass(frozen=True)
class NiahSpec:
    """Everything of the metadata that determines the rows (besides data files and tokenizer)."""

    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    num_samples: int = 6
    seed: int = 0
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
    """

    pieces: list[str]
    boundary: np.ndarray  # boundary[j]: a needle may go right before piece j
    starts: np.ndarray  # piece indices where a window may start (a sentence start)
    tokenizer: object
    cost: np.ndarray  # -1 until computed

    def __len__(self) -> int:
        return len(self.pieces)

    def cumulative(self, start: int, count: int) -> np.ndarray:
        """cum[k] = estimated tokens of the ``k`` pieces from ``start`` (cyclic), cum[0] = 0."""
        idx = (start + np.arange(count)) % len(self.pieces)
        todo = np.unique(idx[self.cost[idx] < 0])
        if len(todo):
            self.cost[todo] = count_plain(self.tokenizer, [self.pieces[i] for i in todo])
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


# ---------------------------------------------------------------------------------- generation
class NiahGenerator:
    """Renders the documents of a spec for one tokenizer, haystack stream and needle list."""

    def __init__(self, spec: NiahSpec, needles: list[Needle], stream: PieceStream, tokenizer):
        self.spec, self.stream, self.tok = spec, stream, tokenizer
        order = sorted(needles, key=lambda n: hashlib.sha256(f"{spec.seed}\0{needle_key(n.needle)}".encode()).digest())
        self.needles = order
        self.template = load_template(spec.prompt_template or DEFAULT_TEMPLATE)
        self._cum: dict[int, np.ndarray] = {}

    def generate(self) -> list[dict]:
        """All documents, ordered (sample, length, depth) so that ``--limit`` stays balanced."""
        docs = []
        for i in range(self.spec.num_samples):
            needle = self.needles[i % len(self.needles)]
            rng = np.random.default_rng([self.spec.seed, 7, i])
            start = int(self.stream.starts[int(rng.integers(len(self.stream.starts)))])
            for length in self.spec.lengths:
                k, fitted = self._fit(start, needle, length)
                window = self.stream.join(start, start + k).lstrip()
                cum = self._cumulative(start, k)
                for depth, (j, prompt, n_tokens) in zip(self.spec.depths, fitted):
                    docs.append(self._doc(i, needle, length, depth, start, k, window, j, cum, prompt, n_tokens))
        return docs

    def _cumulative(self, start: int, count: int) -> np.ndarray:
        cum = self._cum.get(start)
        if cum is None or len(cum) <= count:
            size = max(count + 1, 2 * (len(cum) if cum is not None else 0), 256)
            cum = self._cum[start] = self.stream.cumulative(start, size)
        return cum

    def _context(self, needle: Needle, start: int, k: int, j: int) -> str:
        before = self.stream.join(start, start + j).lstrip()
        after = self.stream.join(start + j, start + k)
        if not before:
            return needle.needle + (" " + after.lstrip() if after.strip() else "")
        return f"{before} {needle.needle}{after}"  # `after` starts with the boundary's own whitespace

    def _insertion(self, start: int, k: int, depth: float) -> int:
        """Piece offset (0..k) of the sentence boundary nearest ``depth`` of the window's tokens."""
        cum = self._cumulative(start, k)
        candidates = np.concatenate([[0], self.stream.boundaries(start, k), [k]])
        return int(candidates[int(np.argmin(np.abs(cum[candidates] - depth * cum[k])))])

    def _render(self, needle: Needle, start: int, k: int) -> tuple[int, list[tuple[int, str, int]]]:
        """(longest prompt in tokens, [(insertion, prompt, tokens) per depth]) for a window of k pieces."""
        rows = []
        for depth in self.spec.depths:
            j = self._insertion(start, k, depth)
            rows.append((j, self.template.render(context=self._context(needle, start, k, j), question=needle.question)))
        counts = count_tokens(self.tok, [p for _, p in rows])
        return max(counts), [(j, p, n) for (j, p), n in zip(rows, counts)]

    def _fit(self, start: int, needle: Needle, length: int) -> tuple[int, list[tuple[int, str, int]]]:
        """A window of k pieces whose prompts fit ``length`` at every depth while k + 1 pieces do not.

        The piece costs give a first guess; every step after it is decided by tokenizing whole prompts.
        """
        frame = count_tokens(self.tok, [self.template.render(context=needle.needle, question=needle.question)])[0]
        budget = length - frame
        if budget < 1:
            raise NeedlesError(
                f"a target of {length} tokens cannot hold the question, the needle and any haystack "
                f"(they alone take {frame} tokens)",
                fix="raise niah_lengths",
            )
        cum = self._cumulative(start, budget + 16)  # every piece costs at least one token
        k = max(1, int(np.searchsorted(cum, budget - 1, side="right")) - 1)  # -1: the space before the needle
        n, res = self._render(needle, start, k)
        if n <= length:  # grow until a window does not fit
            lo, best = k, res
            while True:
                cum = self._cumulative(start, lo + (length - n) + 16)
                k = max(lo + 1, int(np.searchsorted(cum, cum[lo] + (length - n), side="right")) - 1)
                n_k, res = self._render(needle, start, k)
                if n_k > length:
                    hi = k
                    break
                lo, best, n = k, res, n_k
        else:  # shrink until a window fits
            hi = k
            while True:
                if hi <= 1:
                    raise NeedlesError(
                        f"a target of {length} tokens cannot hold the question, the needle and one word of haystack",
                        fix="raise niah_lengths",
                    )
                k = max(1, min(hi - 1, int(np.searchsorted(cum, cum[hi] - (n - length), side="right")) - 1))
                n, res = self._render(needle, start, k)
                if n <= length:
                    lo, best = k, res
                    break
                hi = k
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            n, res = self._render(needle, start, mid)
            if n <= length:
                lo, best = mid, res
            else:
                hi = mid
        return lo, best

    def _doc(self, i, needle: Needle, length, depth, start, k, window, j, cum, prompt, n_tokens) -> dict:
        doc = {
            "sample": i,
            "needle_id": hashlib.sha256(needle_key(needle.needle).encode()).hexdigest()[:12],
            "needle": needle.needle,
            "question": needle.question,
            "real_needle": needle.real_needle,
            "haystack": self.spec.haystack,
            "target_tokens": length,
            "depth": depth,
            "needle_depth": round(float(cum[j] / cum[k]), 4) if cum[k] else 0.0,
            "n_tokens": n_tokens,
            "window_start": start,
            "window_pieces": k,
            "window_sha256": hashlib.sha256(window.encode()).hexdigest(),
            "prompt": prompt,
            "target": needle.real_needle,
        }
        doc["doc_sha256"] = hashlib.sha256(json.dumps([prompt, doc["target"]]).encode()).hexdigest()
        return doc
