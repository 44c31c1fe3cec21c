"""NIAH rows: fit a haystack window to each target length, place the needle at each depth, render.

The data (needles, book haystack, piece stream) are :mod:`harness_ext.tasklib.niah_haystack`; the
sampling design is described in :mod:`harness_ext.tasklib.niah`.

Cost model. Tokenizing whole prompts was the whole cost (five depths per visited window; at 128K
tokens a prompt is ~500 KB), so the window search does not tokenize prompts where it can avoid it,
without changing which windows it visits or what it decides there (rows are byte-identical to the
plain search, which tokenizes every depth of every visited window):

* for GPT-2 style byte-level tokenizers a prompt's exact count is a sum of its parts tokenized alone
  (:mod:`harness_ext.tasklib.niah_count`: template ends with their neighbours, piece costs, needle);
  a spot check tokenizes some cells' longest prompt in full, and a disagreement (a bug) turns the
  sums off and redoes the cell by tokenizing whole prompts;
* elsewhere (other tokenizers, templates, windows), a window that only has to be *rejected* is
  rejected by the first depth found over the target: that depth (the longest one of the last window
  that fit) is tokenized alone first, and the others only if it fits;
* the frame (template + needle, no haystack) is counted once per needle, not once per window;
* piece costs are kept per piece *string* (:class:`~harness_ext.tasklib.niah_haystack.PieceStream`),
  so a new window mostly reuses the costs of words already seen.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.templating import load_template
from harness_ext.tasklib.niah_count import SpliceCounter
from harness_ext.tasklib.niah_haystack import DEFAULT_TEMPLATE, Needle, NiahSpec, PieceStream, needle_key
from harness_ext.tasklib.token_budget import count_tokens

Fitted = list[tuple[int, int]]  # per depth: (insertion piece offset, exact tokens of the prompt)
log = logging.getLogger(__name__)


class NiahGenerator:
    """Renders the documents of a spec for one tokenizer, haystack stream and needle list."""

    splice = True  # count by sums of parts where exact (tests turn it off to compare)

    def __init__(self, spec: NiahSpec, needles: list[Needle], stream: PieceStream, tokenizer: object) -> None:
        self.spec, self.stream, self.tok = spec, stream, tokenizer
        order = sorted(needles, key=lambda n: hashlib.sha256(f"{spec.seed}\0{needle_key(n.needle)}".encode()).digest())
        self.needles = order
        self.template = load_template(spec.prompt_template or DEFAULT_TEMPLATE)
        self._cum: dict[int, np.ndarray] = {}
        self._frames: dict[tuple[str, str], int] = {}
        self._splice = SpliceCounter.for_(self.template, tokenizer, stream) if self.splice else None

    def generate(self) -> list[dict]:
        """All documents, ordered (sample, length, depth) so that ``--limit`` stays balanced."""
        docs = []
        for i in range(self.spec.num_samples):
            needle = self.needles[i % len(self.needles)]
            rng = np.random.default_rng([self.spec.seed, 7, i])
            start = int(self.stream.starts[int(rng.integers(len(self.stream.starts)))])
            for length in self.spec.lengths:
                k, fitted = self._fit(start, needle, length)
                prompts = [self._prompt_at(needle, start, k, j) for j, _ in fitted]
                if not self._checked(i, needle, start, k, fitted, prompts):
                    k, fitted = self._fit(start, needle, length)  # _checked turned the sums off
                    prompts = [self._prompt_at(needle, start, k, j) for j, _ in fitted]
                window = self.stream.join(start, start + k).lstrip()
                cum = self._cumulative(start, k)
                for depth, (j, n_tokens), prompt in zip(self.spec.depths, fitted, prompts):
                    docs.append(self._doc(i, needle, length, depth, start, k, window, j, cum, prompt, n_tokens))
        return docs

    def _checked(self, i: int, needle: Needle, start: int, k: int, fitted: Fitted, prompts: list[str]) -> bool:
        """Spot check of the sums: the longest prompt of a summed cell, tokenized in full.

        Cells of samples 0-3 and every 16th sample are checked: checking all would cost several times
        the rest of generation (at 128K, 0.4 s per prompt; book words are slow to tokenize). A
        disagreement, which would be a bug, turns the sums off for the rest of the run and the caller
        redoes the cell.
        """
        if self._splice is None or not (i < 4 or i % 16 == 0) or not self._splice.window_ok(needle, start, k):
            return True
        longest = int(np.argmax([n for _, n in fitted]))
        exact = count_tokens(self.tok, [prompts[longest]])[0]
        if exact == fitted[longest][1]:
            return True
        log.warning(
            "NIAH: summed count %d != tokenized %d; counting whole prompts from here", fitted[longest][1], exact
        )
        self._splice = None
        return False

    def _cumulative(self, start: int, count: int) -> np.ndarray:
        """Piece-cost sums that steer the search and place the needle (tests skew them to reach every branch)."""
        return self._piece_sums(start, count)

    def _piece_sums(self, start: int, count: int) -> np.ndarray:
        """cum[i] = exact tokens of pieces 0..i-1 of the window at ``start``, each tokenized alone (cached)."""
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

    def _insertions(self, start: int, k: int) -> list[int]:
        """Per depth, the piece offset (0..k) of the sentence boundary nearest that depth of the window's tokens."""
        cum = self._cumulative(start, k)
        candidates = np.concatenate([[0], self.stream.boundaries(start, k), [k]])
        at = cum[candidates]
        return [int(candidates[int(np.argmin(np.abs(at - depth * cum[k])))]) for depth in self.spec.depths]

    def _prompt_at(self, needle: Needle, start: int, k: int, j: int) -> str:
        return self.template.render(context=self._context(needle, start, k, j), question=needle.question)

    def _summed(self, needle: Needle, start: int, k: int) -> bool:
        return self._splice is not None and self._splice.window_ok(needle, start, k)

    def _render(self, needle: Needle, start: int, k: int) -> tuple[int, Fitted]:
        """(longest prompt in tokens, [(insertion, tokens) per depth]) for a window of k pieces."""
        offsets = self._insertions(start, k)
        if self._summed(needle, start, k):
            counts = self._splice.counts(needle, start, k, self._piece_sums(start, k), offsets)  # type: ignore[union-attr]
        else:
            counts = count_tokens(self.tok, [self._prompt_at(needle, start, k, j) for j in offsets])
        return max(counts), list(zip(offsets, counts))

    def _try(self, needle: Needle, start: int, k: int, length: int, fitting: Fitted) -> tuple[int, Fitted | None]:
        """:meth:`_render` where only *fits or not* matters: (tokens, None) as soon as one depth is over.

        Where prompts are tokenized, ``fitting`` (a smaller window's render that fit) gives the depth
        probed first: its longest, the likeliest to go over. The decision equals
        ``_render(...)[0] <= length``; the count returned for a rejected window may be one depth's,
        not the maximum, and callers use it for nothing else.
        """
        if self._summed(needle, start, k):
            n, res = self._render(needle, start, k)
            return n, (res if n <= length else None)
        offsets = self._insertions(start, k)
        first = int(np.argmax([n for _, n in fitting]))
        n_first = count_tokens(self.tok, [self._prompt_at(needle, start, k, offsets[first])])[0]
        if n_first > length:
            return n_first, None
        others = [self._prompt_at(needle, start, k, j) for i, j in enumerate(offsets) if i != first]
        counts = count_tokens(self.tok, others) if others else []
        counts.insert(first, n_first)
        n = max(counts)
        return n, None if n > length else list(zip(offsets, counts))

    def _frame(self, needle: Needle) -> int:
        """Tokens of the prompt holding the needle and no haystack (the same for every window)."""
        key = (needle.needle, needle.question)
        if key not in self._frames:
            prompt = self.template.render(context=needle.needle, question=needle.question)
            self._frames[key] = count_tokens(self.tok, [prompt])[0]
        return self._frames[key]

    def _fit(self, start: int, needle: Needle, length: int) -> tuple[int, Fitted]:
        """A window of k pieces whose prompts fit ``length`` at every depth while k + 1 pieces do not.

        The piece costs give a first guess; every step after it is decided by tokenizing whole prompts.
        Windows that fit are rendered in full (their exact longest count steers the next step); windows
        only to be rejected go through :meth:`_try`.
        """
        frame = self._frame(needle)
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
                n_k, got = self._try(needle, start, k, length, best)
                if got is None:
                    hi = k
                    break
                lo, best, n = k, got, n_k
        else:  # shrink until a window fits; a window over the target steers by its exact longest count
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
            _, got = self._try(needle, start, mid, length, best)
            if got is not None:
                lo, best = mid, got
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
