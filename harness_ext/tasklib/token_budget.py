"""Count prompt tokens of synthetic dictionaries without tokenizing every candidate prompt.

A dictionary line is a fixed skeleton with integer slots. Its token count is modelled as the sum
of per-piece counts looked up in tables built once per tokenizer (every 1-6 digit integer after
each separator, every dictionary name). Boundary effects (e.g. how ``\\n\\n`` merges next to a
header) are absorbed by an affine correction ``a + b * n_lines`` fitted on real tokenizations
and then *validated* on further full tokenizations. When validation fails for a tokenizer the
model is not trusted and callers fall back to exact per-prompt tokenization, so the length
guarantee (prompt <= target) never rests on an unchecked assumption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


def _encode_batch(backend):
    """The backend's batch encoder that skips character offsets (tokenizers >= 0.21), else the plain one.

    Only the number of tokens is wanted: offsets cost about a quarter of the encode time and do not
    change the tokens. ``len(encoding)`` is the token count without building the Python list of ids.
    """
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Exact token counts as the model sees the raw prompt (special tokens included)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path: Rust batch encode, no Python-side objects per token
        return [len(e) for e in _encode_batch(backend)(texts, add_special_tokens=True)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def count_plain(tokenizer, texts: list[str]) -> np.ndarray:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return np.array([len(e) for e in _encode_batch(backend)(texts, add_special_tokens=False)])
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


ASCII_WS = frozenset(" \t\n\r\x0b\x0c")  # whitespace to the tokenizer's regex engine and to Python alike


def additive_tokenizer(tokenizer) -> bool:
    """Is ``count(A + B) = count(A) + count(B)`` wherever A ends in non-whitespace and B starts with whitespace?

    True for the GPT-2 byte-level layout only, read from the tokenizer's own pipeline (not sampled):
    no normalizer, no truncation, a ``ByteLevel`` pre-tokenizer with its regex and no prefix space.
    That pre-tokenizer cuts text with the GPT-2 regex and the model sees each pre-token alone; the
    regex has no look-behind and none of its alternatives matches a non-whitespace character followed
    by whitespace, so at such a place the pre-tokens of ``A + B`` are those of A, then those of B.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.truncation is not None:
        return False
    try:
        pre = json.loads(backend.pre_tokenizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    return pre == {**pre, "type": "ByteLevel", "use_regex": True, "add_prefix_space": False}


def count_pieces(tokenizer, texts: list[str]) -> np.ndarray:
    """:func:`count_plain`, in one encode where the texts can be cut apart exactly.

    Thousands of short encodes cost far more than one long one. For an additive tokenizer (see
    :func:`additive_tokenizer`), texts that start with ASCII whitespace and end with non-whitespace
    are tokenized as one concatenation: every join is a pre-token cut, so each token lies inside one
    text and is attributed to it by its start offset. Other texts are counted one by one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    joinable = [i for i, t in enumerate(texts) if t[:1] in ASCII_WS and not t[-1].isspace()]
    if backend is None or len(joinable) < 2 or not additive_tokenizer(tokenizer):
        return count_plain(tokenizer, texts)
    out = np.zeros(len(texts), dtype=np.int64)
    begins = np.cumsum([0] + [len(texts[i]) for i in joinable])[:-1]
    enc = backend.encode("".join(texts[i] for i in joinable), add_special_tokens=False)
    owner = np.searchsorted(begins, np.array([a for a, _ in enc.offsets], dtype=np.int64), side="right") - 1
    out[joinable] = np.bincount(owner, minlength=len(joinable))
    rest = sorted(set(range(len(texts))) - set(joinable))
    if rest:
        out[rest] = count_plain(tokenizer, [texts[i] for i in rest])
    return out


@dataclass
class PieceTables:
    """Token-count tables for one tokenizer, keyed by separator string."""

    tokenizer: object
    max_number: int
    number_cost: dict[str, np.ndarray] = field(default_factory=dict)
    sep_cost: dict[str, int] = field(default_factory=dict)
    name_cost: np.ndarray | None = None

    def numbers_after(self, sep: str) -> np.ndarray:
        """cost[n] = tokens that integer n adds when it follows ``sep``."""
        if sep not in self.number_cost:
            if self._separable(sep):
                # most tokenizers split punctuation/space from digits: one shared table suffices
                self.number_cost[sep] = self.bare_numbers()
            else:
                with_sep = count_plain(self.tokenizer, [sep + s for s in self._strings()])
                self.number_cost[sep] = with_sep - self.separator(sep)
        return self.number_cost[sep]

    def _strings(self) -> list[str]:
        return [str(n) for n in range(self.max_number + 1)]

    def bare_numbers(self) -> np.ndarray:
        if "" not in self.number_cost:
            self.number_cost[""] = count_plain(self.tokenizer, self._strings())
        return self.number_cost[""]

    def _separable(self, sep: str) -> bool:
        """Does ``sep + n`` cost ``sep`` plus ``n`` for a spread of numbers? (Checked, not assumed.)"""
        probe = np.unique(np.geomspace(1, self.max_number, 300).astype(int))
        joined = count_plain(self.tokenizer, [sep + str(n) for n in probe])
        return bool(np.all(joined == self.separator(sep) + self.bare_numbers()[probe]))

    def separator(self, sep: str) -> int:
        if sep not in self.sep_cost:
            self.sep_cost[sep] = int(count_plain(self.tokenizer, [sep])[0]) if sep else 0
        return self.sep_cost[sep]

    def names(self, upto: int) -> np.ndarray:
        """cost[i] = tokens of ``Dictionary [i] `` for i in 0..upto."""
        if self.name_cost is None or len(self.name_cost) <= upto:
            size = max(upto + 1, 2 * (0 if self.name_cost is None else len(self.name_cost)), 256)
            self.name_cost = count_plain(self.tokenizer, [f"Dictionary [{i}] " for i in range(size)])
        return self.name_cost


_TABLES: dict[int, PieceTables] = {}


def tables_for(tokenizer, max_number: int) -> PieceTables:
    key = id(tokenizer)
    tab = _TABLES.get(key)
    if tab is None or tab.max_number < max_number:
        tab = PieceTables(tokenizer=tokenizer, max_number=max_number)
        _TABLES[key] = tab
    return tab


@dataclass
class AffineCorrection:
    """exact = estimate + a + b * n_lines, validated on held-out prompts."""

    a: float
    b: float
    trusted: bool

    def apply(self, estimate: np.ndarray | int, n_lines: np.ndarray | int):
        return np.asarray(estimate) + self.a + self.b * np.asarray(n_lines)


def fit_correction(estimates: list[int], n_lines: list[int], exact: list[int]) -> AffineCorrection:
    """Fit on the first two calibration prompts; trust only if it is exact on all the others."""
    e = np.asarray(estimates, dtype=np.int64)
    n = np.asarray(n_lines, dtype=np.int64)
    x = np.asarray(exact, dtype=np.int64)
    resid = x - e
    if len(e) < 3 or n[0] == n[1]:
        return AffineCorrection(0, 0, False)
    b = (resid[1] - resid[0]) / (n[1] - n[0])
    a = resid[0] - b * n[0]
    if b != round(b) or a != round(a):
        return AffineCorrection(0, 0, False)
    predicted = e + a + b * n
    return AffineCorrection(int(a), int(b), bool(np.all(predicted == x)))
