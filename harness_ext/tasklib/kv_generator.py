"""Synthetic key-value retrieval data (Artificial Needles, arXiv 2406.19292, section 1).

One generator for the simple-dictionary task (reference rules: 3-4 digit integers, gold dict of
3 keys, others 3-4 keys, gold key and gold value unique in the prompt) and the multi-subkey task
(tuple keys; distractors share some but never all gold subkeys). It adds what the reference
lacks: prompts sized to an exact token budget of the evaluated model's tokenizer, and the gold
dictionary placed at chosen relative depths, every depth using the *same* dictionaries so that
position effects are paired.

Determinism: every base sample draws from ``numpy.random.default_rng([seed, variant, length, i])``
(PCG64, platform independent), so the same spec and tokenizer give byte-identical documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.templating import load_template
from harness_ext.tasklib.token_budget import AffineCorrection, count_plain, count_tokens, fit_correction, tables_for

GENERATOR_VERSION = 1
Variant = Literal["simple", "multisubkey"]
_VARIANT_ID = {"simple": 1, "multisubkey": 2}
_LINE_PREFIX = "Dictionary [{}] "


@dataclass(frozen=True)
class KVSpec:
    """Everything that determines a KV dataset. Equal specs (and tokenizer) give equal bytes."""

    variant: Variant = "simple"
    answer_template: bool = False
    num_samples: int = 10  # base samples per length; each is rendered once per depth
    seed: int = 0
    lengths: tuple[int, ...] | None = None  # target prompt tokens; None -> use num_dicts
    num_dicts: int = 85
    depths: tuple[float, ...] | None = (0.0, 0.25, 0.5, 0.75, 1.0)  # None -> uniform random
    gold_dict_size: int = 3
    dict_size_range: tuple[int, int] = (3, 4)
    key_digits: tuple[int, int] = (3, 4)
    value_digits: tuple[int, int] = (3, 4)
    subkeys: int = 3  # multi-subkey: subkeys per key
    common_subkeys: int = 2  # multi-subkey: gold subkeys that distractors may share
    prob_has_common: float = 0.5
    prob_per_common: float = 0.5
    prompt_template: str | None = None  # a user .jinja file; rendered sandboxed

    def validate(self) -> None:
        def bad(problem: str, fix: str) -> None:
            raise NeedlesError(f"KV spec: {problem}", fix=fix)

        if self.variant not in _VARIANT_ID:
            bad(f"unknown variant {self.variant!r}", "use 'simple' or 'multisubkey'")
        if self.num_samples < 1:
            bad(f"num_samples={self.num_samples}", "use a positive number of samples")
        if self.seed < 0:
            bad(f"seed={self.seed}", "use a seed of 0 or more")
        for name, (lo, hi) in (("key_digits", self.key_digits), ("value_digits", self.value_digits)):
            if not 1 <= lo <= hi <= 6:
                bad(f"{name}={[lo, hi]}", "use a digit range within 1..6, low <= high")
        lo, hi = self.dict_size_range
        if not 1 <= lo <= hi:
            bad(f"dict_size_range={[lo, hi]}", "use 1 <= low <= high")
        if self.gold_dict_size < 1:
            bad(f"gold_dict_size={self.gold_dict_size}", "use at least 1")
        if self.lengths is not None and any(int(x) < 64 for x in self.lengths):
            bad(f"lengths={list(self.lengths)} has a target below 64 tokens", "use targets of 64 tokens or more")
        if self.lengths is None and self.num_dicts < 1:
            bad(f"num_dicts={self.num_dicts}", "use at least 1 dictionary")
        if self.depths is not None and any(not 0.0 <= d <= 1.0 for d in self.depths):
            bad(f"depths={list(self.depths)}", "give relative depths between 0.0 (first) and 1.0 (last)")
        if self.variant == "multisubkey":
            if not 0 <= self.common_subkeys < self.subkeys:
                bad(
                    f"common_subkeys={self.common_subkeys} with subkeys={self.subkeys}",
                    "common_subkeys must be smaller than subkeys (distractors never share all subkeys)",
                )
            if self.key_digits[0] < 2:
                bad("multi-subkey needs subkeys of at least 2 digits", "raise key_digits")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Base:
    """One base sample: every dictionary as arrays, before the gold one is placed at a depth.

    Dictionary 0 is the gold dictionary; 1.. are distractors in prompt order. ``keys`` is
    (pairs, subkeys) and ``values`` (pairs,), with dictionary j owning rows ``starts[j]:starts[j+1]``.
    """

    gold_key: tuple[int, ...]
    gold_value: int
    question_key: tuple[int, ...]  # the subkeys in the (shuffled) order the question states them
    keys: np.ndarray
    values: np.ndarray
    sizes: np.ndarray
    uniform_index: int = 0  # gold position when depths is None (reference: uniform)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)])


def _draw_numbers(rng: np.random.Generator, digits: tuple[int, int], n: int) -> np.ndarray:
    d = rng.integers(digits[0], digits[1] + 1, size=n)
    low = 10 ** (d - 1)
    return rng.integers(low, 10 * low)


def _question_key_str(spec: KVSpec, key: tuple[int, ...]) -> str:
    return str(key[0]) if spec.variant == "simple" else ", ".join(str(k) for k in key)


@lru_cache(maxsize=64)
def _line_format(size: int, subkeys: int) -> str:
    # Reference rendering: Python dict repr; single keys print bare, tuple keys as tuples.
    key = "%d" if subkeys == 1 else "(" + ", ".join(["%d"] * subkeys) + ")"
    return _LINE_PREFIX.format("%d") + "{" + ", ".join([key + ": %d"] * size) + "}"


class KVGenerator:
    """Builds documents for a :class:`KVSpec`, optionally sized with a tokenizer."""

    def __init__(self, spec: KVSpec, tokenizer=None):
        spec.validate()
        if spec.lengths is not None and tokenizer is None:
            raise NeedlesError(
                "KV tasks with token-length targets need the evaluated model's tokenizer",
                fix="pass --model_args pretrained=... (or tokenizer=...), or set a fixed "
                "--metadata '{\"num_dicts\": 85}' instead of lengths",
            )
        self.spec = spec
        self.tokenizer = tokenizer
        self._subkeys = 1 if spec.variant == "simple" else spec.subkeys
        self._template = load_template(spec.prompt_template or self._default_template())
        self._answer = load_template("kv/answer.jinja")
        self._max_number = 10 ** max(spec.key_digits[1], spec.value_digits[1]) - 1
        self.token_model_trusted: bool | None = None

    def _default_template(self) -> str:
        if self.spec.variant == "multisubkey":
            return "kv/multisubkey.jinja"
        return "kv/simple_answer_template.jinja" if self.spec.answer_template else "kv/simple.jinja"

    # ------------------------------------------------------------------ sampling
    def _sample_base(self, rng: np.random.Generator, n_distractors: int) -> _Base:
        spec, k = self.spec, self._subkeys
        if k == 1:
            gold_key = (int(_draw_numbers(rng, spec.key_digits, 1)[0]),)
        else:
            subs = dict.fromkeys(int(s) for s in _draw_numbers(rng, spec.key_digits, 4 * k))
            gold_key = tuple(list(subs)[:k])
        commons = tuple(int(c) for c in rng.permutation(np.array(gold_key))[: spec.common_subkeys]) if k > 1 else ()
        gold_value = int(_draw_numbers(rng, spec.value_digits, 1)[0])
        while gold_value in gold_key:
            gold_value = int(_draw_numbers(rng, spec.value_digits, 1)[0])
        question_key = tuple(int(x) for x in rng.permutation(np.array(gold_key))) if k > 1 else gold_key

        sizes = np.concatenate(
            [[spec.gold_dict_size], rng.integers(spec.dict_size_range[0], spec.dict_size_range[1] + 1, n_distractors)]
        )
        n = int(sizes.sum())
        owners = np.repeat(np.arange(len(sizes)), sizes)
        keys = np.empty((n, k), dtype=np.int64)
        self._fill_keys(rng, np.arange(n), keys, gold_key, gold_value, commons, owners)
        values = _draw_numbers(rng, spec.value_digits, n)
        # Gold key and gold value are unique in the prompt: no other number may equal either.
        forbidden = np.array(sorted(set(gold_key) | {gold_value}) if k == 1 else [gold_value])
        while (bad := np.isin(values, forbidden)).any():
            values[bad] = _draw_numbers(rng, spec.value_digits, int(bad.sum()))
        gold_slot = int(rng.integers(spec.gold_dict_size))
        keys[gold_slot], values[gold_slot] = gold_key, gold_value
        return _Base(gold_key, gold_value, question_key, keys, values, sizes)

    def _fill_keys(self, rng, rows, keys, gold_key, gold_value, commons, owners) -> None:
        """Draw ``keys[rows]`` until no key equals (or, multi-subkey, holds every subkey of) the
        gold key, no (sub)key equals the gold value, no tuple repeats a subkey, and no dictionary
        repeats a key (Python dict keys)."""
        spec, k = self.spec, self._subkeys
        gold_sorted = np.sort(np.array(gold_key))
        while len(rows):
            fresh = _draw_numbers(rng, spec.key_digits, len(rows) * k).reshape(len(rows), k)
            if commons:
                has_common = rng.random(len(rows)) < spec.prob_has_common
                slots = np.argsort(rng.random((len(rows), k)), axis=1)  # distinct slot per common subkey
                for j, c in enumerate(commons):
                    take = has_common & (rng.random(len(rows)) < spec.prob_per_common)
                    fresh[take, slots[take, j]] = c
            keys[rows] = fresh
            srt = np.sort(keys, axis=1)
            bad = (srt == gold_sorted).all(axis=1) | (np.diff(srt, axis=1) == 0).any(axis=1)
            bad |= (keys == gold_value).any(axis=1)
            if k == 1:  # one sortable code per (dictionary, key)
                code = owners * 10**7 + keys[:, 0]
                order = np.argsort(code, kind="stable")
                same = code[order][1:] == code[order][:-1]
            else:
                ident = np.concatenate([owners[:, None], keys], axis=1)
                order = np.lexsort(ident.T[::-1])
                same = (ident[order][1:] == ident[order][:-1]).all(axis=1)
            bad[order[1:][same]] = True
            rows = np.flatnonzero(bad)

    # ------------------------------------------------------------------ token budget
    def _pair_costs(self, base: _Base) -> np.ndarray:
        """Modelled tokens of each ``key: value`` pair, including the separator before it."""
        tab, s = tables_for(self.tokenizer, self._max_number), None
        s = tab.separator
        first = np.zeros(len(base.values), dtype=bool)
        first[base.starts[:-1]] = True
        keys = base.keys
        if self._subkeys == 1:
            lead = np.where(
                first, tab.numbers_after("{")[keys[:, 0]] + s("{"), tab.numbers_after(", ")[keys[:, 0]] + s(", ")
            )
            rest = 0
            close = tab.numbers_after(": ")[base.values] + s(": ")
        else:
            lead = np.where(
                first, tab.numbers_after("{(")[keys[:, 0]] + s("{("), tab.numbers_after(", (")[keys[:, 0]] + s(", (")
            )
            rest = (tab.numbers_after(", ")[keys[:, 1:]] + s(", ")).sum(axis=1)
            close = tab.numbers_after("): ")[base.values] + s("): ")
        return lead + rest + close

    def _frame_costs(self, question_keys: list[str]) -> tuple[int, np.ndarray]:
        """Tokens of the text around the dictionaries: the header once, the footer per gold key."""
        marker = "\x00DICTS\x00"
        texts = [self._template.render(disctionaries=marker, gold_key_str=q) for q in question_keys]
        header = texts[0].split(marker)[0]
        footers = [t.split(marker)[1] for t in texts]
        return int(count_plain(self.tokenizer, [header])[0]), count_plain(self.tokenizer, footers)

    # ------------------------------------------------------------------ rendering
    def _render(self, base: _Base, m: int, gold_index: int) -> tuple[str, str]:
        """Prompt with the gold dictionary and the first m-1 distractors, gold at ``gold_index``."""
        order = np.concatenate([np.arange(1, gold_index + 1), [0], np.arange(gold_index + 1, m)])
        st = base.starts
        g1 = gold_index + 1
        rows = np.concatenate([np.arange(st[1], st[g1]), np.arange(0, st[1]), np.arange(st[g1], st[m])])
        sizes = base.sizes[order]
        cells = np.concatenate([base.keys[rows], base.values[rows, None]], axis=1).ravel()
        line_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * (self._subkeys + 1)
        args = np.insert(cells, line_starts, np.arange(1, m + 1))
        fmt = "\n".join(_line_format(int(z), self._subkeys) for z in sizes)
        qkey = _question_key_str(self.spec, base.question_key)
        prompt = self._template.render(disctionaries=fmt % tuple(args.tolist()), gold_key_str=qkey)
        target = self._answer.render(gold_key_str=qkey, gold_value=base.gold_value, gold_dict_name=gold_index + 1)
        return prompt, target

    # ------------------------------------------------------------------ public
    def generate(self) -> list[dict]:
        """All documents, ordered (sample, length, depth) so that ``--limit`` stays balanced."""
        spec = self.spec
        lengths = list(spec.lengths) if spec.lengths is not None else [None]
        sized = {length: self._bases_for_length(length) for length in lengths}
        depths = list(spec.depths) if spec.depths is not None else [None]
        docs = []
        for i in range(spec.num_samples):
            for length in lengths:
                base, m, n_tokens = sized[length][i]
                for depth in depths:
                    gold_index = base.uniform_index if depth is None else int(round(depth * (m - 1)))
                    prompt, target = self._render(base, m, gold_index)
                    docs.append(self._doc(i, length, depth, base, m, gold_index, prompt, target, n_tokens))
        if spec.lengths is None and self.tokenizer is not None:
            for d, n in zip(docs, count_tokens(self.tokenizer, [d["prompt"] for d in docs])):
                d["n_tokens"] = n
        return docs

    def _bases_for_length(self, length: int | None) -> list[tuple[_Base, int, int | None]]:
        spec = self.spec
        if length is not None:
            return self._sized_bases(length)
        out = []
        for i in range(spec.num_samples):
            rng = np.random.default_rng([spec.seed, _VARIANT_ID[spec.variant], 0, i])
            base = self._sample_base(rng, spec.num_dicts - 1)
            base.uniform_index = int(rng.integers(spec.num_dicts))
            out.append((base, spec.num_dicts, None))
        return out

    def _pool_size(self, length: int) -> int:
        """Distractors to draw so the prompt overshoots the target: expected line cost + 20%."""
        spec, tab = self.spec, tables_for(self.tokenizer, self._max_number)
        lo, hi = 10 ** (spec.key_digits[0] - 1), 10 ** spec.key_digits[1]
        pair = self._subkeys * (float(tab.numbers_after(", ")[lo:hi].mean()) + tab.separator(", "))
        lo, hi = 10 ** (spec.value_digits[0] - 1), 10 ** spec.value_digits[1]
        pair += float(tab.numbers_after(": ")[lo:hi].mean()) + tab.separator(": ")
        line = float(tab.names(2)[1]) + pair * sum(spec.dict_size_range) / 2
        return int(length / max(line, 1.0) * 1.2) + 8

    def _sized_bases(self, length: int, pool: int | None = None) -> list[tuple[_Base, int, int]]:
        spec = self.spec
        tab = tables_for(self.tokenizer, self._max_number)
        # Enough distractors to overshoot any target: every line costs at least `min_line` tokens.
        pool = pool or self._pool_size(length)
        drawn = []
        for i in range(spec.num_samples):
            rng = np.random.default_rng([spec.seed, _VARIANT_ID[spec.variant], length, i])
            drawn.append((self._sample_base(rng, pool), rng))
        header, footers = self._frame_costs([_question_key_str(spec, b.question_key) for b, _ in drawn])
        name_cum = np.cumsum(tab.names(pool + 2)[1 : pool + 2])  # names of lines 1..m
        m_all = np.arange(1, pool + 2)  # candidate dictionary counts (gold included)
        estimates = []
        for (base, _), footer in zip(drawn, footers):
            body = np.add.reduceat(self._pair_costs(base), base.starts[:-1]) + 1 * tab.separator("}")
            distractors = np.concatenate([[0], np.cumsum(body[1:])])[m_all - 1]
            nl = tab.separator("\n") * (m_all - 1)
            estimates.append(header + footer + body[0] + distractors + name_cum[m_all - 1] + nl)
        if any(est[-1] <= length for est in estimates):  # pool estimate too small: draw more
            return self._sized_bases(length, pool * 2)
        corr = self._calibrate([b for b, _ in drawn], estimates)
        out = []
        for (base, rng), est in zip(drawn, estimates):
            modelled = corr.apply(est, m_all)
            fits = np.flatnonzero(modelled <= length)
            if len(fits) == 0:
                raise NeedlesError(
                    f"a target of {length} tokens cannot hold one dictionary plus the question",
                    fix="raise the target length",
                )
            m = int(fits[-1]) + 1
            n_tokens = int(modelled[m - 1])
            if not corr.trusted:
                m, n_tokens = self._exact_fit(base, m, length)
            base.uniform_index = int(rng.integers(m))
            out.append((base, m, n_tokens))
        return out

    def _calibrate(self, bases: list[_Base], estimates: list[np.ndarray]) -> AffineCorrection:
        """Fit the additive model's boundary correction on real tokenizations, then validate it."""
        picks = []
        for base, est in zip(bases, estimates):
            for m in (max(1, len(est) // 3), max(2, (2 * len(est)) // 3)):
                picks.append((base, m, int(est[m - 1])))
            if len(picks) >= 6:
                break
        exact = count_tokens(self.tokenizer, [self._render(b, m, 0)[0] for b, m, _ in picks])
        corr = fit_correction([e for *_, e in picks], [m for _, m, _ in picks], exact)
        self.token_model_trusted = corr.trusted
        return corr

    def _exact_fit(self, base: _Base, m: int, length: int) -> tuple[int, int]:
        """Slow but exact: tokenize whole prompts (used when the additive model is not trusted)."""

        def n_tok(k: int) -> int:
            return count_tokens(self.tokenizer, [self._render(base, k, 0)[0]])[0]

        n = n_tok(m)
        while n > length and m > 1:
            m -= 1
            n = n_tok(m)
        while m < len(base.sizes) and (nxt := n_tok(m + 1)) <= length:
            m, n = m + 1, nxt
        return m, n

    def _doc(self, i, length, depth, base: _Base, m, gold_index, prompt, target, n_tokens) -> dict:
        spec = self.spec
        doc = {
            "variant": spec.variant,
            "answer_template": spec.answer_template or spec.variant == "multisubkey",
            "sample": i,
            "target_tokens": length,
            "depth": depth,
            "gold_index": gold_index,
            "gold_depth": round(gold_index / (m - 1), 4) if m > 1 else 0.0,
            "num_dicts": m,
            "n_tokens": n_tokens,
            "gold_key": _question_key_str(spec, base.question_key),
            "gold_value": str(base.gold_value),
            "gold_dict": gold_index + 1,
            "prompt": prompt,
            "target": target,
        }
        doc["doc_sha256"] = hashlib.sha256(json.dumps([prompt, target]).encode()).hexdigest()
        return doc
