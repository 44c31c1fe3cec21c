"""Cross-model activation patching per attention head (Zhao, Yin, Durrett, ICML 2025; PAPERS.md section 4).

The same tokens go through a source model (e.g. the real-data finetune) and a target model (e.g. a
synthetic-data finetune); in the target, the chosen heads' output is replaced by the source's at every
position of the prompt and of the continuation. Two sites, named as in TransformerLens:

* ``result``: the head's contribution to the residual stream, ``o_proj.weight[:, h*d:(h+1)*d] @ z_h``
  (the source's weights applied to the source's z); the target's own contribution is subtracted;
* ``z``: the head's slice of the input to ``o_proj`` (the target's ``o_proj`` is then applied to it).

Continuations: ``teacher-forced`` feeds the unpatched target's own greedy tokens and reads the patched
target's argmax at every continuation position (one forward pass per condition; the source's activations
are recorded once per item); ``regenerate`` decodes the patched target greedily, running the source on the
same growing sequence (both with a KV cache) so its activations always match the tokens so far.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from harness_ext.core.errors import NeedlesError
from harness_ext.heads.knockout import EvalSet, paired_ci95
from harness_ext.heads.model import LoadedModel, stop_token_ids
from harness_ext.heads.patch_report import minus_random, se, side
from harness_ext.heads.patch_sets import HeadSet
from harness_ext.heads.scores import Head, rounded

SITES = ("result", "z")
CONTINUATIONS = ("teacher-forced", "regenerate")
SCHEMA = "needles.heads.patch/1"


def o_projs(lm: LoadedModel) -> list[torch.nn.Linear]:
    """The output projection of every layer's attention (Llama/Mistral-style q/k/v/o_proj)."""
    out = []
    for mod in lm.ctl.modules:
        o = getattr(mod, "o_proj", None)
        if not isinstance(o, torch.nn.Linear):
            raise NeedlesError(
                f"{type(mod).__name__} has no o_proj linear layer, so its heads cannot be patched",
                fix="use a Llama/Mistral-style model (q_proj, k_proj, v_proj, o_proj)",
            )
        out.append(o)
    return out


def head_dim(lm: LoadedModel) -> int:
    return o_projs(lm)[0].in_features // lm.ctl.num_heads


@contextmanager
def recording(lm: LoadedModel) -> Iterator[list[torch.Tensor | None]]:
    """Record every layer's o_proj input (all heads' z) of the forward passes inside the block (last one wins)."""
    acts: list[torch.Tensor | None] = [None] * lm.ctl.num_layers

    def hook(layer: int):
        def pre(_mod, args):
            acts[layer] = args[0].detach()

        return pre

    handles = [o.register_forward_pre_hook(hook(i)) for i, o in enumerate(o_projs(lm))]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patched(
    target: LoadedModel, source: LoadedModel, acts: list, heads: Sequence[Head], site: str = "result"
) -> Iterator[None]:
    """In the block, ``heads`` of ``target`` take the source's output from ``acts`` (filled by ``recording``).

    ``acts`` is read at call time, so a caller may refill it between forward passes (regenerate).
    """
    if site not in SITES:
        raise NeedlesError(f"patch site {site!r} is unknown", fix="use result or z")
    d = head_dim(target)
    t_o, s_o = o_projs(target), o_projs(source)
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(set(heads)):
        if not (0 <= layer < target.ctl.num_layers and 0 <= head < target.ctl.num_heads):
            raise NeedlesError(
                f"head {layer}-{head} does not exist in a {target.ctl.num_layers}x{target.ctl.num_heads} model",
                fix="use layer-head indices of this model",
            )
        by_layer.setdefault(layer, []).append(head)

    def source_z(layer: int, z: torch.Tensor) -> torch.Tensor:
        src = acts[layer]
        if src is None or src.shape != z.shape:
            raise RuntimeError(f"layer {layer}: no source activations for this forward pass (a bug)")
        return src.to(device=z.device, dtype=z.dtype)

    def z_hook(layer: int, idx: torch.Tensor):
        def pre(_mod, args):
            z = args[0].clone()
            z[..., idx] = source_z(layer, z)[..., idx]
            return (z, *args[1:])

        return pre

    def result_hook(layer: int, idx: torch.Tensor):
        w_t, w_s = t_o[layer].weight, s_o[layer].weight

        def post(_mod, args, output):
            z = args[0]
            own = F.linear(z[..., idx], w_t[:, idx])
            theirs = F.linear(source_z(layer, z)[..., idx], w_s[:, idx].to(device=z.device, dtype=z.dtype))
            return output - own + theirs

        return post

    handles = []
    for layer, hs in by_layer.items():
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs]).to(t_o[layer].weight.device)
        if site == "z":
            handles.append(t_o[layer].register_forward_pre_hook(z_hook(layer, idx)))
        else:
            handles.append(t_o[layer].register_forward_hook(result_hook(layer, idx)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def patched_logits(
    target: LoadedModel, source: LoadedModel, ids: torch.Tensor, heads: Sequence[Head], site: str = "result"
) -> torch.Tensor:
    """Logits of ``target`` on ``ids`` (batch, seq) with ``heads`` patched from ``source`` at every position."""
    with torch.inference_mode():
        if not heads:
            return target.model(input_ids=ids).logits
        with recording(source) as acts:
            source.model(input_ids=ids)
        with patched(target, source, acts, heads, site):
            return target.model(input_ids=ids).logits


def greedy(
    target: LoadedModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    source: LoadedModel | None = None,
    heads: Sequence[Head] = (),
    site: str = "result",
) -> list[int]:
    """Greedy tokens of ``target`` (patched from ``source`` when heads are given), ending at a stop token."""
    stop = stop_token_ids(target.tokenizer)
    step = torch.tensor([list(prompt)])
    cache_t = cache_s = None
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if heads:
                assert source is not None
                with recording(source) as acts:
                    cache_s = source.model(input_ids=step, past_key_values=cache_s, use_cache=True).past_key_values
                with patched(target, source, acts, heads, site):
                    res = target.model(input_ids=step, past_key_values=cache_t, use_cache=True)
            else:
                res = target.model(input_ids=step, past_key_values=cache_t, use_cache=True)
            cache_t = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
            step = torch.tensor([[token]])
    return out


def forced_reply(logits: torch.Tensor, prompt_len: int, n: int, stop: set[int]) -> list[int]:
    """Argmax tokens at the ``n`` continuation positions of a teacher-forced pass, cut after a stop token."""
    preds = logits[0, prompt_len - 1 : prompt_len - 1 + n].argmax(dim=-1).tolist()
    for i, t in enumerate(preds):
        if t in stop:
            return preds[: i + 1]
    return preds


def run_patching(
    source: LoadedModel,
    target: LoadedModel,
    evalset: EvalSet,
    sets: Sequence[HeadSet],
    site: str = "result",
    continuation: str = "teacher-forced",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The unpatched target, the source, and the target with each set patched, scored per item; paired deltas."""
    if continuation not in CONTINUATIONS:
        raise NeedlesError(f"continuation {continuation!r} is unknown", fix="use teacher-forced or regenerate")
    if not evalset.texts:
        raise NeedlesError("no items to evaluate the patching on", fix="raise --eval-samples")
    tok = target.tokenizer
    stop = stop_token_ids(tok)
    conds = [(s, d, heads) for s in sets for d, heads in enumerate(s.draws)]
    n_items = len(evalset.texts)
    base, ref = np.zeros(n_items), np.zeros(n_items)
    scores = np.zeros((len(conds), n_items))
    base_replies: list[str] = []
    ref_replies: list[str] = []
    replies: list[list[str]] = [[] for _ in conds]

    def reply(tokens: list[int]) -> str:
        return tok.decode(tokens, skip_special_tokens=True)

    for i, (text, scorer) in enumerate(zip(evalset.texts, evalset.scorers)):
        prompt = tok(text, add_special_tokens=not target.chat)["input_ids"]
        if continuation == "teacher-forced":
            cont = greedy(target, prompt, evalset.max_new_tokens)
            ids = torch.tensor([prompt + cont])
            with torch.inference_mode():
                base_logits = target.model(input_ids=ids).logits
                with recording(source) as acts:
                    src_logits = source.model(input_ids=ids).logits
            outs = [forced_reply(base_logits, len(prompt), len(cont), stop)]
            outs.append(forced_reply(src_logits, len(prompt), len(cont), stop))
            for _, _, heads in conds:
                with torch.inference_mode(), patched(target, source, acts, heads, site):
                    logits = target.model(input_ids=ids).logits
                outs.append(forced_reply(logits, len(prompt), len(cont), stop))
        else:
            outs = [greedy(target, prompt, evalset.max_new_tokens), greedy(source, prompt, evalset.max_new_tokens)]
            outs += [greedy(target, prompt, evalset.max_new_tokens, source, h, site) for _, _, h in conds]
        texts = [reply(o) for o in outs]
        base[i], ref[i] = scorer(texts[0]), scorer(texts[1])
        base_replies.append(texts[0])
        ref_replies.append(texts[1])
        for c, t in enumerate(texts[2:]):
            scores[c, i] = scorer(t)
            replies[c].append(t)
        if progress:
            print(f"[needles heads] patch item {i + 1}/{n_items}", file=sys.stderr, flush=True)

    per_set: dict[str, np.ndarray] = {}
    out_sets = []
    for s in sets:
        rows = [c for c, (cs, _, _) in enumerate(conds) if cs is s]
        mat = scores[rows]  # (draws, items)
        per_item = mat.mean(axis=0)  # random:K: each item's score averaged over the draws
        per_set[s.name] = per_item
        diff = per_item - base
        gap = float(ref.mean() - base.mean())
        out_sets.append(
            {
                "set": s.name,
                "kind": s.kind,
                "num_heads": len(s.draws[0]),
                "draws": len(s.draws),
                "accuracy": rounded(per_item.mean()),
                "accuracy_stderr": se(per_item),
                "delta": rounded(diff.mean()),
                "delta_stderr": se(diff),
                "delta_ci95": paired_ci95(diff, seed),
                "gap_closed": rounded(diff.mean() / gap) if gap != 0 else None,
                "draw_sd": rounded(np.std(mat.mean(axis=1), ddof=1)) if len(rows) > 1 else None,
                "runs": [
                    {
                        "draw": conds[c][1],
                        "heads": [list(h) for h in conds[c][2]],
                        "accuracy": rounded(scores[c].mean()),
                        "per_item": [rounded(x) for x in scores[c]],
                        "replies": replies[c],
                    }
                    for c in rows
                ],
            }
        )
    return {
        "schema": SCHEMA,
        "task": evalset.task,
        "metric": evalset.metric,
        "num_items": n_items,
        "data_sha256": evalset.data_sha256,
        "site": site,
        "continuation": continuation,
        "seed": seed,
        "max_new_tokens": evalset.max_new_tokens,
        "target_baseline": side(base, base_replies),
        "source_reference": side(ref, ref_replies),
        "sets": out_sets,
        "intersection_minus_random": minus_random(per_set, sets, seed),
    }
