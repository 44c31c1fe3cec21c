"""NIAH rows: fit a haystack window to each target length, place the needle at each depth, render.

The data (needles, book haystack, piece stream) are :mod:`harness_ext.tasklib.niah_haystack`; the
sampling design is described in :mod:`harness_ext.tasklib.niah`.

Cost model. Tokenizing whole prompts was 94 % of generation time, so the window search cuts how
many prompts it tokenizes, without changing which windows it visits or what it decides there (rows are
byte-identical to the plain search):

* a window that *fits* needs every depth's exact count (all must fit; the longest steers the next
  step), but a window that only has to be *rejected* is rejected by the first depth found over the
  target: that depth (the longest one of the last window that fit) is tokenized alone first, and
  the others only if it fits;
* the frame (template + needle, no haystack) is counted once per needle, not once per window;
* piece costs are kept per piece *string* (:class:`~harness_ext.tasklib.niah_haystack.PieceStream`),
  so a new window mostly reuses the costs of words already seen.

Every count that decides anything is still an exact tokenization of the full prompt.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.templating import load_template
from harness_ext.tasklib.niah_haystack import DEFAULT_TEMPLATE, Needle, NiahSpec, PieceStream, needle_key
from harness_ext.tasklib.token_budget import count_tokens

Fitted = list[tuple[int, str, int]]  # per depth: (insertion piece offset, prompt, exact tokens)


class NiahGenerator:
    """Renders the documents of a spec for one tokenizer, haystack stream and needle list."""

    def __init__(self, spec: NiahSpec, needles: list[Needle], stream: PieceStream, tokenizer: object) -> None:
        self.spec, self.stream, self.tok = spec, stream, tokenizer
        order = sorted(needles, key=lambda n: hashlib.sha256(f"{spec.seed}\0{needle_key(n.needle)}".encode()).digest())
        self.needles = order
        self.template = load_template(spec.prompt_template or DEFAULT_TEMPLATE)
        self._cum: dict[int, np.ndarray] = {}
        self._frames: dict[tuple[str, str], int] = {}

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

    def _prompt(self, needle: Needle, start: int, k: int, depth: float) -> tuple[int, str]:
        j = self._insertion(start, k, depth)
        return j, self.template.render(context=self._context(needle, start, k, j), question=needle.question)

    def _render(self, needle: Needle, start: int, k: int) -> tuple[int, Fitted]:
        """(longest prompt in tokens, [(insertion, prompt, tokens) per depth]) for a window of k pieces."""
        rows = [self._prompt(needle, start, k, depth) for depth in self.spec.depths]
        counts = count_tokens(self.tok, [p for _, p in rows])
        return max(counts), [(j, p, n) for (j, p), n in zip(rows, counts)]

    def _try(self, needle: Needle, start: int, k: int, length: int, fitting: Fitted) -> tuple[int, Fitted | None]:
        """:meth:`_render` where only *fits or not* matters: (tokens, None) as soon as one depth is over.

        ``fitting`` is a smaller window's render that fit; its longest depth is probed first, as the
        likeliest to go over. The decision equals ``_render(...)[0] <= length``; the count returned
        for a rejected window is one depth's, not the maximum, and callers use it for nothing else.
        """
        depths = self.spec.depths
        first = int(np.argmax([n for _, _, n in fitting]))
        probe = self._prompt(needle, start, k, depths[first])
        n_first = count_tokens(self.tok, [probe[1]])[0]
        if n_first > length:
            return n_first, None
        rows = [probe if i == first else self._prompt(needle, start, k, d) for i, d in enumerate(depths)]
        others = [p for i, (_, p) in enumerate(rows) if i != first]
        counts = count_tokens(self.tok, others) if others else []
        counts.insert(first, n_first)
        n = max(counts)
        return n, None if n > length else [(j, p, c) for (j, p), c in zip(rows, counts)]

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
