"""Exact NIAH prompt token counts as sums over parts tokenized alone (no whole-prompt tokenization).

Why: past 32K tokens, tokenizing whole prompts (five depths per visited window) was the whole cost of
NIAH generation. A prompt is a template head, a window of haystack pieces with the needle spliced in,
and a template tail; the pieces' token costs are already known (:class:`PieceStream` keeps them per
piece string), so for the tokenizers below the count is head + piece costs + needle + tail.

When the sum is exact. For the tokenizers of :func:`~harness_ext.tasklib.token_budget.additive_tokenizer`
(GPT-2 byte-level: SmolLM2, GPT-2, ...), ``count(A + B) = count(A) + count(B)`` wherever a
non-whitespace character is followed by whitespace (the reason is given there). A NIAH prompt is cut
only at such places: before each haystack piece after the window's first (a piece starts with
whitespace, the piece before it ends with a non-whitespace character), at the space that joins the
needle, and after the needle (stripped, so it ends with non-whitespace; the next piece starts with
whitespace). The template text around the context is tokenized *together with* its neighbour (first
piece or needle; last piece or needle), since nothing is known about those two junctions.

Only ASCII whitespace is trusted as a piece's lead (Python and the tokenizer's regex engine differ on
a few Unicode spaces). Windows holding a piece without one (the first piece of a ``raw`` haystack
where the stream wraps around), other tokenizers (SentencePiece; Llama-3/Qwen regexes, whose
punctuation alternative swallows following newlines), and templates that do not insert the context
verbatim once, are counted by whole-prompt tokenization, as before.
"""

from __future__ import annotations

import numpy as np

from harness_ext.tasklib.niah_haystack import Needle, PieceStream
from harness_ext.tasklib.token_budget import ASCII_WS, additive_tokenizer, count_plain, count_tokens

_PROBES = ("\x00needles-context-a\x00", "\x00needles-context-bb\x00")


class SpliceCounter:
    """Token counts of ``template(context=window with the needle at piece offset j)`` for many j and windows."""

    def __init__(self, template: object, tokenizer: object, stream: PieceStream) -> None:
        self.template, self.tok, self.stream = template, tokenizer, stream
        # Pieces after a window's first must start with ASCII whitespace for the cut before them to hold.
        bad = np.array([p[:1] not in ASCII_WS for p in stream.pieces])
        self._bad = np.flatnonzero(bad)
        self._specials = count_tokens(tokenizer, ["a"])[0] - int(count_plain(tokenizer, ["a"])[0])
        self._known: dict[str, int] = {}
        self._frames: dict[str, tuple[str, str] | None] = {}

    @classmethod
    def for_(cls, template: object, tokenizer: object, stream: PieceStream) -> SpliceCounter | None:
        """A counter, or None where the sum would not be exact for this tokenizer."""
        return cls(template, tokenizer, stream) if additive_tokenizer(tokenizer) else None

    def frame(self, question: str) -> tuple[str, str] | None:
        """(text before, text after) the context in the rendered template, or None if it is not inserted verbatim once."""
        if question not in self._frames:
            a, b = (self.template.render(context=p, question=question) for p in _PROBES)
            got = None
            if a.count(_PROBES[0]) == 1:
                head, tail = a.split(_PROBES[0])
                if b == head + _PROBES[1] + tail:
                    got = (head, tail)
            self._frames[question] = got
        return self._frames[question]

    def window_ok(self, needle: Needle, start: int, k: int) -> bool:
        """Can this window's prompts be counted by the sum (every cut a non-whitespace -> whitespace one)?"""
        if self.frame(needle.question) is None or not needle.needle or needle.needle[-1].isspace():
            return False
        n = len(self.stream.pieces)
        if k - 1 >= n:
            return len(self._bad) == 0
        return not np.any((self._bad - start - 1) % n < k - 1)  # offsets 1..k-1 of the window

    def counts(self, needle: Needle, start: int, k: int, cum: np.ndarray, offsets: list[int]) -> list[int]:
        """Exact tokens of the prompt with ``needle`` before piece ``j`` of the window, for each j in ``offsets``.

        ``cum`` is the window's cumulative piece costs (``cum[i]``: pieces 0..i-1). The caller checked
        :meth:`window_ok`. The splice mirrors ``NiahGenerator._context``.
        """
        head, tail = self.frame(needle.question)  # type: ignore[misc]  # window_ok checked it
        pieces, n = self.stream.pieces, len(self.stream.pieces)
        first, last = pieces[start % n].lstrip(), pieces[(start + k - 1) % n]
        spliced = " " + needle.needle
        plans = []  # per offset: (explicit parts, tokens from cum)
        for j in offsets:
            if j == 0:  # needle + " " + window
                if k == 1:
                    plans.append(([head + needle.needle, " " + first + tail], 0))
                else:
                    plans.append(([head + needle.needle, " " + first, last + tail], cum[k - 1] - cum[1]))
            elif j == k:  # window + " " + needle
                plans.append(([head + first, spliced + tail], cum[k] - cum[1]))
            else:  # 1 <= j <= k - 1: pieces 1..j-1, the needle, pieces j..k-2, then the last piece with the tail
                plans.append(([head + first, spliced, last + tail], cum[k - 1] - cum[1]))
        todo = sorted({p for parts, _ in plans for p in parts if p not in self._known})
        if todo:
            self._known.update(zip(todo, count_plain(self.tok, todo).tolist()))
        return [self._specials + int(mid) + sum(self._known[p] for p in parts) for parts, mid in plans]
