"""Head knockout: task accuracy with chosen heads' attention made uniform.

Knocking out a head sets its pre-softmax attention logits to a constant at every position and
every step (prefill and decoding), so it attends uniformly to what it can see (Wu et al.; Zhao et
al.). ``top:K`` knocks out the K best-scoring heads of a scores file (our heads.json or a published
head_score file, see harness_ext.heads.scorefile); ``random:K`` draws K heads
uniformly from the heads *outside* that top-K set, once per draw (seeded), and averages the draws.

The main task is the plugin's KV retrieval: documents from harness_ext.tasklib.kv_generator (same spec fields
as the lm-eval task), the task's chat formatting, greedy decoding, and the task's
``process_results`` for ``value_acc``. NIAH (Wu et al.'s ROUGE check) is available as a second
task. Every condition runs on the same items, so differences are paired per item; their 95%
intervals are the percentile bootstrap of harness_ext.core.stats.paired_bootstrap.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness_ext.core.errors import NeedlesError
from harness_ext.core.stats import paired_bootstrap
from harness_ext.heads.model import LoadedModel, stop_token_ids
from harness_ext.heads.prompts import Probe, format_input
from harness_ext.heads.scores import Head, ranked_heads, rounded
from harness_ext.tasklib.metrics import niah_success

_SPEC = re.compile(r"^(top|random):(\d+)$")


@dataclass(frozen=True)
class Knockout:
    """One knockout condition: the top-K heads, or K random heads outside the top-K set."""

    kind: str  # top | random
    k: int

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}"


def parse_knockout(text: str) -> Knockout:
    """``top:K`` or ``random:K`` (K >= 1), as given to --knockout."""
    m = _SPEC.match(text.strip())
    if not m or int(m.group(2)) < 1:
        raise NeedlesError(
            f"--knockout {text!r} is not top:K or random:K", fix="e.g. --knockout top:10 --knockout random:10"
        )
    return Knockout(m.group(1), int(m.group(2)))


def check_knockout(spec: Knockout, total_heads: int) -> None:
    """Refuse a condition the model cannot satisfy (checked before any slow work, and again on use)."""
    if spec.k > total_heads:
        raise NeedlesError(f"{spec.name} asks for more heads than the model has ({total_heads})", fix="lower K")
    if spec.kind == "random" and spec.k > total_heads - spec.k:
        raise NeedlesError(
            f"{spec.name}: only {total_heads - spec.k} heads lie outside the top-{spec.k} set", fix="lower K"
        )


def select_heads(scores: np.ndarray, spec: Knockout, draw: int = 0, seed: int = 0) -> list[Head]:
    """The top-K heads, or K random heads outside the top-K set (reproducible from seed, K and draw)."""
    ranked = ranked_heads(scores)
    check_knockout(spec, len(ranked))
    top = ranked[: spec.k]
    if spec.kind == "top":
        return sorted(top)
    pool = sorted(set(ranked) - set(top))
    rng = np.random.default_rng([seed, spec.k, draw])
    picks = rng.choice(len(pool), size=spec.k, replace=False)
    return sorted(pool[int(i)] for i in picks)


def generate(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy replies, left-padded batches (batch composition is fixed, so results are reproducible)."""
    from transformers import GenerationConfig

    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = sorted(stop_token_ids(tok))
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stop or None, num_beams=1
    )
    # Pad by hand: tokenizer(..., padding=True) leaves padding switched on in the fast tokenizer's
    # backend, which would corrupt later token counts made through it (harness_ext.tasklib.token_budget).
    encoded = [tok(t, add_special_tokens=not lm.chat)["input_ids"] for t in texts]
    replies: list[str] = []
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i : i + batch_size]
        width = max(len(x) for x in batch)
        ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        replies.extend(tok.batch_decode(out[:, width:], skip_special_tokens=True))
    return replies


@dataclass
class EvalSet:
    """A task to score under knockout: model inputs and a per-reply scorer (1.0 = correct)."""

    task: str
    metric: str
    texts: list[str]
    scorers: list[Callable[[str], float]]
    max_new_tokens: int
    data_sha256: str = ""


def kv_eval_set(lm: LoadedModel, docs: Sequence[dict], max_new_tokens: int = 32) -> EvalSet:
    """The plugin's KV retrieval: its documents, chat formatting as ``--apply_chat_template``, ``value_acc``."""
    from harness_ext.tasklib.kv import process_results

    def scorer(doc: dict) -> Callable[[str], float]:
        return lambda reply: process_results(doc, [reply])["value_acc"]

    texts = [format_input(lm.tokenizer, d["prompt"], None, lm.chat)[0] for d in docs]
    variant = "kv_retrieval_simple_template" if docs and docs[0].get("answer_template") else "kv_retrieval_simple"
    return EvalSet(variant, "value_acc", texts, [scorer(d) for d in docs], max_new_tokens, _sha(texts))


def niah_eval_set(probes: Sequence[Probe], max_new_tokens: int = 48) -> EvalSet:
    """NIAH as Wu et al. score it: ROUGE-1 recall of the reference answer in the first line of the reply > 0.5."""

    def scorer(answer: str) -> Callable[[str], float]:
        return lambda reply: niah_success(answer, reply.strip().split("\n")[0])

    texts = [p.text for p in probes]
    return EvalSet("niah", "rouge1_recall>0.5", texts, [scorer(p.answer) for p in probes], max_new_tokens, _sha(texts))


def _sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def evaluate(
    lm: LoadedModel, evalset: EvalSet, heads: Sequence[Head], batch_size: int = 8
) -> tuple[np.ndarray, list[str]]:
    """Per-item score with ``heads`` knocked out (none: the baseline)."""
    with lm.ctl.knocked_out(heads):
        replies = generate(lm, evalset.texts, evalset.max_new_tokens, batch_size)
    return np.array([f(r) for f, r in zip(evalset.scorers, replies)], dtype=float), replies


def _se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def paired_ci95(diff: np.ndarray, seed: int) -> list[float]:
    """Two-sided 95% percentile bootstrap interval of the mean paired difference (resampling items)."""
    lo, hi = paired_bootstrap(diff, alpha=0.025, seed=seed).ci
    return [rounded(lo), rounded(hi)]


def run_knockouts(
    lm: LoadedModel,
    scores: np.ndarray,
    specs: Sequence[Knockout],
    evalset: EvalSet,
    draws: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Baseline, then each knockout condition, on the same items; paired deltas with uncertainty."""
    if not evalset.texts:
        raise NeedlesError("no items to evaluate the knockout on", fix="raise --eval-samples")

    def log(msg: str) -> None:
        if progress:
            print(f"[needles heads] knockout {msg}", file=sys.stderr, flush=True)

    base, base_replies = evaluate(lm, evalset, [], batch_size)
    log(f"baseline {evalset.metric} {base.mean():.3f} on {len(base)} items")
    conditions = []
    per_doc: dict[str, np.ndarray] = {}
    for spec in specs:
        n_draws = 1 if spec.kind == "top" else draws
        runs = []
        for d in range(n_draws):
            heads = select_heads(scores, spec, d, seed)
            acc, _ = evaluate(lm, evalset, heads, batch_size)
            runs.append(
                {
                    "draw": d,
                    "heads": [list(h) for h in heads],
                    "accuracy": rounded(acc.mean()),
                    "accuracy_stderr": rounded(_se(acc)),
                    "per_doc": acc,
                }
            )
            log(f"{spec.name} draw {d}: {evalset.metric} {acc.mean():.3f}")
        mat = np.stack([r["per_doc"] for r in runs])  # (draws, docs)
        doc_mean = mat.mean(axis=0)  # random: each document's accuracy averaged over the draws
        per_doc[spec.name] = doc_mean
        diff = doc_mean - base
        draw_means = mat.mean(axis=1)
        conditions.append(
            {
                "knockout": spec.name,
                "kind": spec.kind,
                "k": spec.k,
                "draws": n_draws,
                "accuracy": rounded(doc_mean.mean()),
                "accuracy_stderr": rounded(_se(doc_mean)),
                "draw_sd": rounded(np.std(draw_means, ddof=1)) if n_draws > 1 else None,
                "delta": rounded(diff.mean()),
                "delta_stderr": rounded(_se(diff)),
                "delta_ci95": paired_ci95(diff, seed),
                "runs": [{k: v for k, v in r.items() if k != "per_doc"} for r in runs],
            }
        )
    return {
        "task": evalset.task,
        "metric": evalset.metric,
        "num_items": len(base),
        "data_sha256": evalset.data_sha256,
        "seed": seed,
        "max_new_tokens": evalset.max_new_tokens,
        "baseline": {"accuracy": rounded(base.mean()), "accuracy_stderr": rounded(_se(base))},
        "conditions": conditions,
        "top_vs_random": _top_vs_random(per_doc, specs, seed),
        "baseline_replies_sample": base_replies[:5],
    }


def _top_vs_random(per_doc: dict[str, np.ndarray], specs: Sequence[Knockout], seed: int) -> list[dict]:
    """For each K run both ways: accuracy(top) - accuracy(random), paired per document."""
    out = []
    for k in sorted({s.k for s in specs}):
        top, rnd = per_doc.get(f"top:{k}"), per_doc.get(f"random:{k}")
        if top is None or rnd is None:
            continue
        diff = top - rnd
        out.append(
            {
                "k": k,
                "delta_top_minus_random": rounded(diff.mean()),
                "stderr": rounded(_se(diff)),
                "ci95": paired_ci95(diff, seed),
            }
        )
    return out


def format_knockout(result: dict) -> str:
    """The knockout result as text: baseline, each condition's delta with its CI, top vs random."""
    b = result["baseline"]
    lines = [
        f"{result['task']} {result['metric']} on {result['num_items']} items: baseline {b['accuracy']:.3f} "
        f"± {b['accuracy_stderr']:.3f}"
    ]
    for c in result["conditions"]:
        extra = f", {c['draws']} draws, draw sd {c['draw_sd']:.3f}" if c["draw_sd"] is not None else ""
        lines.append(
            f"  {c['knockout']:>10}: {c['accuracy']:.3f} ± {c['accuracy_stderr']:.3f}  "
            f"delta {c['delta']:+.3f} ± {c['delta_stderr']:.3f} (95% CI {c['delta_ci95'][0]:+.3f}.."
            f"{c['delta_ci95'][1]:+.3f}){extra}"
        )
    for t in result["top_vs_random"]:
        lines.append(
            f"  top:{t['k']} - random:{t['k']}: {t['delta_top_minus_random']:+.3f} ± {t['stderr']:.3f} "
            f"(95% CI {t['ci95'][0]:+.3f}..{t['ci95'][1]:+.3f})"
        )
    return "\n".join(lines)
