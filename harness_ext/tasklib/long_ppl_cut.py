"""Cut a long text into (context, continuation) pairs of exact token counts in the evaluated model's tokenizer.

A document is a continuation of exactly C scored tokens at a fixed place of a text, and for each context length
P the text right before it, of exactly P tokens. Exact means as lm-eval sees the request:

* context: ``count_tokens(context) == P`` (the tokenizer's special tokens included, as the model receives it);
* continuation: lm-eval scores ``tok(context + continuation)[len(tok(context)):]``
  (``TemplateLM._encode_pair``), so ``count(context + continuation) - count(context) == C``.

Where the cuts go. The continuation starts at a *clean junction*: one space between two letters, so the context
ends in a letter and the continuation starts with " word". Every tokenizer we know cuts there (GPT-2 and
Llama-3 style regexes, SentencePiece's word boundary), so the scored continuation is the same for every P; it is
still verified for each P, and a junction that fails is skipped. The continuation ends after a whole word. The
context starts at a word; when no word start gives exactly P tokens (a multi-token word straddles the count),
it starts inside that word, at the character where the count is P (``context_start_in_word`` in the row).

Finding the cuts without tokenizing every candidate: the whole text is tokenized once, and the token offsets
give an estimate for any cut; each estimate is then checked by tokenizing the candidate itself, and the search
moves by the exact difference until the count is exact. The estimate only steers; every accepted count is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.token_budget import count_plain, count_tokens

_PIECE = re.compile(r"\s*\S+")
_MAX_STEPS = 64  # exact counts per search; estimates are off by a few tokens, so a few steps suffice
_MAX_JUNCTIONS = 64  # junctions tried per document before giving up


@dataclass(frozen=True)
class Cut:
    continuation_start: int  # character offsets in the text
    continuation_end: int
    context_starts: dict[int, tuple[int, bool]]  # P -> (character offset, starts inside a word)


class TextCutter:
    """The cuts of one text for one tokenizer (see the module docstring)."""

    def __init__(self, text: str, tokenizer: object) -> None:
        self.text, self.tok = text, tokenizer
        spans = [(m.start(), m.end()) for m in _PIECE.finditer(text)]
        self.piece = np.array([a for a, _ in spans], dtype=np.int64)  # piece start (its leading whitespace)
        self.word = np.array([b - len(text[a:b].lstrip()) for a, b in spans], dtype=np.int64)  # its word's start
        self.end = np.array([b for _, b in spans], dtype=np.int64)
        starts = self._token_starts(text)
        self.n_tokens = len(starts)
        self.tok_piece = np.searchsorted(starts, self.piece)  # tokens before each piece (estimate)
        self.tok_word = np.searchsorted(starts, self.word)
        self.specials = count_tokens(tokenizer, ["a"])[0] - int(count_plain(tokenizer, ["a"])[0])

    def _token_starts(self, text: str) -> np.ndarray:
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            return np.array([a for a, _ in backend.encode(text, add_special_tokens=False).offsets], dtype=np.int64)
        n = int(count_plain(self.tok, [text])[0])  # no offsets: spread the tokens evenly (only steers the search)
        return np.linspace(0, len(text), n, endpoint=False).astype(np.int64)

    # ------------------------------------------------------------------ exact counts
    def _context_count(self, start: int, stop: int) -> int:
        return count_tokens(self.tok, [self.text[start:stop]])[0]

    def scored(self, context_start: int, start: int, stop: int, context_plain: int | None = None) -> int:
        """Tokens lm-eval scores for the continuation ``text[start:stop]`` after ``text[context_start:start]``
        (``context_plain``: the context's count without special tokens, when known)."""
        if context_plain is None:
            context_plain = int(count_plain(self.tok, [self.text[context_start:start]])[0])
        return int(count_plain(self.tok, [self.text[context_start:stop]])[0]) - context_plain

    # ------------------------------------------------------------------ the search
    def clean(self, j: int) -> bool:
        """Does piece ``j`` start a clean junction (a single space between two letters)?"""
        a = int(self.piece[j])
        if a == 0 or self.word[j] != a + 1 or self.text[a] != " ":
            return False
        return self.text[a - 1].isalpha() and self.text[a + 1].isalpha()

    def capacity(self, longest: int, continuation: int) -> tuple[int, int]:
        """(first, last) token positions where a continuation may start: after ``longest`` context tokens (and a
        margin for the estimate), ending before the text does."""
        return longest + 32, self.n_tokens - continuation - 32

    def cut(self, at_token: int, contexts: tuple[int, ...], continuation: int, stop_token: int) -> Cut | None:
        """The first document whose continuation starts at or after token ``at_token`` (and before ``stop_token``),
        or None when no junction there gives exact counts."""
        j = int(np.searchsorted(self.tok_piece, at_token))
        tried = 0
        while j < len(self.piece) and self.tok_piece[j] < stop_token and tried < _MAX_JUNCTIONS:
            if self.clean(j):
                tried += 1
                got = self._at(j, contexts, continuation)
                if got is not None:
                    return got
            j += 1
        return None

    def _at(self, j: int, contexts: tuple[int, ...], continuation: int) -> Cut | None:
        probe = int(self.word[max(0, j - 64)])  # a short context to size the continuation (verified per P below)
        q = self._continuation_end(j, continuation, probe)
        if q is None:
            return None
        start, stop = int(self.piece[j]), int(self.end[q])
        found = {}
        for p in contexts:
            got = self._context_start(j, p)
            if got is None or self.scored(got[0], start, stop, p - self.specials) != continuation:
                return None
            found[p] = got
        return Cut(start, stop, found)

    def _continuation_end(self, j: int, want: int, probe: int) -> int | None:
        """The piece q such that pieces j..q score exactly ``want`` tokens, or None when a word straddles the count."""
        start = int(self.piece[j])
        ends = np.append(self.tok_piece, self.n_tokens)  # ends[q + 1]: estimated tokens before the end of piece q

        def count(q: int) -> int:
            return self.scored(probe, start, int(self.end[q]))

        def guess(q: int, n: int) -> int:
            return int(np.searchsorted(ends, ends[q + 1] + (want - n))) - 1

        first = int(np.searchsorted(ends, self.tok_piece[j] + want)) - 1
        q, _ = _search(count, want, j - 1, len(self.piece), first, guess)
        return q

    def _context_start(self, j: int, want: int) -> tuple[int, bool] | None:
        """(start, inside a word) of the context of exactly ``want`` tokens that ends where piece ``j`` starts.

        Searched over x = -i (i: the piece whose word starts the context), so the count grows with x."""
        stop = int(self.piece[j])

        def count(x: int) -> int:
            return self._context_count(int(self.word[-x]), stop)

        def guess(x: int, n: int) -> int:
            return -int(np.searchsorted(self.tok_word, self.tok_word[-x] + (n - want)))

        first = -int(np.searchsorted(self.tok_word, self.tok_piece[j] - (want - self.specials)))
        x, below = _search(count, want, -j, 1, first, guess)
        if x is not None:
            return int(self.word[-x]), False
        if below == 0:  # even the whole text before the junction is shorter
            raise NeedlesError(
                f"the text before a continuation holds fewer than {want} tokens", fix="lower long_ppl_contexts"
            )
        return self._inside_word(-below - 1, stop, want)

    def _inside_word(self, i: int, stop: int, want: int) -> tuple[int, bool] | None:
        """A start inside word ``i``, whose first letter gives more than ``want`` tokens and the next word fewer."""
        lo, hi = int(self.word[i]) + 1, int(self.end[i]) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            n = self._context_count(mid, stop)
            if n == want:
                return mid, True
            lo, hi = (mid + 1, hi) if n > want else (lo, mid - 1)
        return None


def _search(count, want: int, lo: int, hi: int, x: int, guess) -> tuple[int | None, int]:
    """An x in (lo, hi) with ``count(x) == want``, for ``count`` non-decreasing in x; ``lo`` / ``hi`` are taken to
    count below / above ``want``. ``guess(x, count(x))`` proposes the next x (an estimate). Returns (x, lo), or
    (None, lo) when ``want`` falls between ``count(lo)`` and ``count(lo + 1)``."""
    for _ in range(_MAX_STEPS):
        if hi - lo <= 1:
            return None, lo
        x = min(max(x, lo + 1), hi - 1)
        n = count(x)
        if n == want:
            return x, lo
        lo, hi = (x, hi) if n < want else (lo, x)
        nxt = guess(x, n)
        if not lo < nxt < hi:
            nxt = x + 1 if n < want else x - 1
        x = nxt if lo < nxt < hi else (lo + hi) // 2
    raise NeedlesError(
        f"no exact cut of {want} tokens found in {_MAX_STEPS} tokenizations (the token offsets mislead the search)",
        fix="report this with the tokenizer's name; other long_ppl_contexts may work",
    )
