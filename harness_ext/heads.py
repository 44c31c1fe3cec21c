"""Retrieval heads (Wu et al., arXiv 2404.15574): which attention heads copy the needle.

During greedy decoding, at each step that generates token ``w``, head ``h`` *copy-pastes* when the
argmax of its attention row (the current query over every cached position) lies inside the needle
span and that position holds ``w``. A probe's score for ``h`` is the number of such steps divided by
the needle length in tokens; a head's retrieval score is the mean over the probes the model actually
answered (NIAH: ROUGE-1 recall of the reference answer > 0.5; KV: the plugin's ``value_acc``).

Mechanics: one extra attention implementation, registered with transformers' ``AttentionInterface``
(so it works for any causal LM whose attention goes through that interface, a peft-wrapped one
included). It delegates to SDPA unless a layer is being recorded (decode steps: argmax per head) or
has knocked-out heads (their pre-softmax logits set to a constant, i.e. uniform attention over the
visible positions, as the reference implementations do).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness_ext import atomic_io
from harness_ext.errors import NeedlesError

SCHEMA = "needles.heads/1"
ATTN_IMPL = "needles_heads"
DEFAULT_THRESHOLD = 0.1
Head = tuple[int, int]  # (layer, head)


# ----------------------------------------------------------------------------------- instrumentation
class HeadControl:
    """Per-model switchboard read by the attention function: what to record, which heads to knock out."""

    def __init__(self, modules: list[torch.nn.Module], num_heads: int):
        self.modules = modules
        self.num_layers = len(modules)
        self.num_heads = num_heads
        self.recording = False
        self.argmax: list[torch.Tensor | None] = [None] * self.num_layers
        self.knock: dict[int, list[int]] = {}

    def set_knockout(self, heads: Iterable[Head]) -> None:
        knock: dict[int, list[int]] = {}
        for layer, head in sorted(set(heads)):
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise NeedlesError(
                    f"head ({layer}, {head}) does not exist in a {self.num_layers}x{self.num_heads} model",
                    fix="use heads from a scores file of the same model",
                )
            knock.setdefault(layer, []).append(head)
        self.knock = knock

    @contextmanager
    def knocked_out(self, heads: Iterable[Head]):
        self.set_knockout(heads)
        try:
            yield self
        finally:
            self.knock = {}

    @contextmanager
    def record(self):
        """Record, for every layer, the argmax position of each head's last attention row."""
        self.argmax = [None] * self.num_layers
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def argmax_matrix(self) -> torch.Tensor:
        """(batch, layers, heads) positions recorded by the last forward pass."""
        missing = [i for i, a in enumerate(self.argmax) if a is None]
        if missing:
            raise NeedlesError(
                f"attention layers {missing[:5]} did not go through the instrumented attention",
                fix="this model's attention does not use transformers' AttentionInterface; use a supported model",
            )
        return torch.stack(self.argmax, dim=1)  # type: ignore[arg-type]


def _visible_mask(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """An additive float mask (0 visible, -inf hidden) from whatever mask transformers built."""
    if attention_mask is None:
        if q_len == 1:
            return None
        # Bottom-right aligned causal mask: query i sits at absolute position kv_len - q_len + i.
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        hidden = torch.arange(kv_len, device=device)[None, :] > rows
        return torch.zeros(q_len, kv_len, device=device).masked_fill(hidden, float("-inf"))[None, None]
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    else:
        mask = mask.float().masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))
    # A left-padding query row sees nothing: let it see everything instead of producing NaN (its output is
    # never used, but NaN keys/values would poison the real rows through 0 * NaN).
    return mask.masked_fill(torch.isinf(mask).all(dim=-1, keepdim=True), 0.0)


def needles_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SDPA, except in layers that are recorded or have knocked-out heads (then eager, instrumented)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    ctl: HeadControl | None = getattr(module, "_needles_ctl", None)
    layer = getattr(module, "_needles_layer", None)
    knock = ctl.knock.get(layer) if ctl is not None else None
    record = ctl is not None and ctl.recording
    if not knock and not record:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    keys, values = repeat_kv(key, groups), repeat_kv(value, groups)
    logits = torch.matmul(query.float(), keys.float().transpose(2, 3)) * scaling
    if knock:
        logits[:, knock] = 0.0  # constant pre-softmax logits: uniform attention over visible keys
    mask = _visible_mask(attention_mask, query.shape[2], keys.shape[2], query.device)
    if mask is not None:
        logits = logits + mask
    if record:
        # torch.argmax returns the first maximal index: ties resolve deterministically to the earliest position.
        ctl.argmax[layer] = logits[:, :, -1, :].argmax(dim=-1)
    weights = torch.softmax(logits, dim=-1).to(value.dtype)
    out = torch.matmul(weights, values).transpose(1, 2).contiguous()
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, needles_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    found = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("Attention") and isinstance(getattr(mod, "layer_idx", None), int):
            if not any(name.startswith(prev + ".") for prev, _ in found):
                found.append((name, mod))
    mods = sorted((m for _, m in found), key=lambda m: m.layer_idx)
    if not mods or [m.layer_idx for m in mods] != list(range(len(mods))):
        raise NeedlesError(
            f"cannot find one attention module per layer in {type(model).__name__}",
            fix="use a decoder-only transformers model (Llama, Mistral, Qwen2, ...) ",
        )
    return mods


def instrument(model: torch.nn.Module) -> HeadControl:
    """Switch ``model`` to the instrumented attention and return its controller."""
    _register_attention()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    mods = _attention_modules(model)
    ctl = HeadControl(mods, int(text_config.num_attention_heads))
    for i, mod in enumerate(mods):
        mod._needles_ctl = ctl
        mod._needles_layer = i
    model.set_attn_implementation(ATTN_IMPL)
    return ctl


# ----------------------------------------------------------------------------------- model loading
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    ctl: HeadControl
    info: dict = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return bool(self.info.get("chat_template"))


def _dir_sha256(path: Path, names: Sequence[str]) -> str | None:
    h, seen = hashlib.sha256(), False
    for name in names:
        f = path / name
        if f.is_file():
            seen = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest() if seen else None


def load_model(
    model: str | Path, adapter: str | Path | None = None, dtype: str = "float32", chat_template: bool | None = None
) -> LoadedModel:
    """A causal LM (optionally with a peft LoRA adapter merged in) in eval mode, instrumented."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise NeedlesError(f"dtype {dtype!r} is not supported", fix="use float32 or bfloat16")
    try:
        tok = AutoTokenizer.from_pretrained(str(model))
        lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise NeedlesError(
            f"cannot load model {model!r}: {str(exc).splitlines()[0]}",
            fix="pass a local Hugging Face model folder (needles models smollm2 prints one)",
        ) from None
    info = {"model": str(model), "adapter": str(adapter) if adapter else None, "dtype": dtype}
    model_dir = Path(model)
    if model_dir.is_dir():
        info["model_config_sha256"] = _dir_sha256(model_dir, ["config.json"])
    if adapter:
        lm = _merge_adapter(lm, Path(adapter))
        info["adapter_sha256"] = _dir_sha256(
            Path(adapter), ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
        )
    lm.eval()
    use_chat = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tok, "chat_template", None):
        raise NeedlesError(f"{model} has no chat template", fix="drop --chat-template (plain prompts are used)")
    info["chat_template"] = use_chat
    ctl = instrument(lm)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    info.update(
        num_layers=ctl.num_layers,
        num_heads=ctl.num_heads,
        num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or ctl.num_heads),
    )
    return LoadedModel(lm, tok, ctl, info)


def _merge_adapter(lm, adapter: Path):
    if not (adapter / "adapter_config.json").is_file():
        raise NeedlesError(
            f"{adapter} is not a peft adapter folder (no adapter_config.json)",
            fix="pass the folder that peft's save_pretrained wrote",
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise NeedlesError("--adapter needs peft", fix="pip install 'lm-eval-needles[train]'") from None

    # Merged weights: the same function as the adapter, and generation runs at base-model speed.
    return PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()


# ----------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class Probe:
    """One prompt with a known needle: ``needle`` is a character span of ``text`` (the model input)."""

    probe_id: str
    family: str  # niah | kv | mdqa
    text: str
    needle: tuple[int, int]
    answer: str  # reference answer for the success check
    doc: dict = field(default_factory=dict, hash=False, compare=False)  # family payload (KV doc, MDQA doc)
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def format_input(tokenizer, user: str, system: str | None, chat: bool) -> tuple[str, int]:
    """The model input for a user message, and the offset of the user message inside it."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{system}\n\n{user}" if system else user
    offset = text.rfind(user)
    if offset < 0:
        raise NeedlesError("the chat template rewrote the prompt text", fix="use --no-chat-template")
    return text, offset


def encode(tokenizer, probe: Probe, chat: bool) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the probe and the token span [start, end) covering its needle characters."""
    enc = tokenizer(probe.text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    lo, hi = probe.needle
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < hi and e > lo]
    if not inside:
        raise NeedlesError(f"probe {probe.probe_id}: the needle maps to no token", fix="report this as a bug")
    return list(ids), (inside[0], inside[-1] + 1)


# ----------------------------------------------------------------------------------- detection
@dataclass
class ProbeResult:
    probe: Probe
    n_tokens: int
    needle_tokens: int
    response: str
    retrieved: bool
    success_value: float
    hits: np.ndarray  # (layers, heads) copy-paste steps


def greedy_trace(
    lm: LoadedModel, ids: list[int], span: tuple[int, int], max_new_tokens: int, stop_at_newline: bool = True
) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with the copy-paste count of every head (reference loop: prefill all but the last
    prompt token, then feed one token per step and check the attention row that produced the next one)."""
    model, ctl = lm.model, lm.ctl
    stop = _stop_ids(lm.tokenizer)
    prompt = torch.tensor([ids])
    hits = torch.zeros(ctl.num_layers, ctl.num_heads, dtype=torch.int64)
    generated: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=prompt[:, :-1], use_cache=True)
        past, inp = out.past_key_values, prompt[:, -1:]
        context = prompt[0]
        for _ in range(max_new_tokens):
            with ctl.record():
                out = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            hits += copy_hits(ctl.argmax_matrix()[0], span, context, token).long()
            if token in stop:
                break
            generated.append(token)
            if stop_at_newline and "\n" in lm.tokenizer.decode([token]):
                break  # the reference stops at a newline: the answer is one line
            context = torch.cat([context, torch.tensor([token])])
            inp = torch.tensor([[token]])
    return generated, hits.numpy()


def copy_hits(argmax: torch.Tensor, span: tuple[int, int], context: torch.Tensor, token: int) -> torch.Tensor:
    """Wu et al.'s copy-paste test for one step: each head's most-attended position lies in the needle
    span and holds the token just generated. ``argmax`` is (layers, heads) positions into ``context``."""
    inside = (argmax >= span[0]) & (argmax < span[1])
    same = context[argmax.clamp(0, len(context) - 1)] == token
    return inside & same


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def run_probe(lm: LoadedModel, probe: Probe, extra_tokens: int = 24) -> ProbeResult:
    from harness_ext import heads_probes

    ids, span = encode(lm.tokenizer, probe, lm.chat)
    needle_len = span[1] - span[0]
    # NIAH and MDQA answers are one line (both references stop at a newline); KV decodes like its task (no stop).
    generated, hits = greedy_trace(lm, ids, span, needle_len + extra_tokens, stop_at_newline=probe.family != "kv")
    response = lm.tokenizer.decode(generated, skip_special_tokens=True)
    value = heads_probes.success(probe, response)
    return ProbeResult(probe, len(ids), needle_len, response, value > 0.5, value, hits)


def aggregate(results: Sequence[ProbeResult], num_layers: int, num_heads: int) -> tuple[np.ndarray, int]:
    """Mean per-probe score (hits / needle tokens) over the retrieved probes; zeros when none was."""
    good = [r.hits / r.needle_tokens for r in results if r.retrieved]
    if not good:
        return np.zeros((num_layers, num_heads)), 0
    return np.mean(np.stack(good), axis=0), len(good)


def retrieval_heads(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """Heads with score > threshold, best first (ties: lower layer, then lower head)."""
    order = ranked_heads(scores)
    return [
        {"layer": int(la), "head": int(h), "score": _r(scores[la, h])} for la, h in order if scores[la, h] > threshold
    ]


def ranked_heads(scores: np.ndarray) -> list[Head]:
    flat = [(-float(scores[la, h]), la, h) for la in range(scores.shape[0]) for h in range(scores.shape[1])]
    return [(la, h) for _, la, h in sorted(flat)]


def _r(x: float) -> float:
    return round(float(x), 6)


def detect(
    lm: LoadedModel, probes: Sequence[Probe], extra_tokens: int = 24, progress: bool = True
) -> list[ProbeResult]:
    results = []
    for i, probe in enumerate(probes, 1):
        res = run_probe(lm, probe, extra_tokens)
        results.append(res)
        if progress:
            mark = "ok " if res.retrieved else "miss"
            print(
                f"[needles heads] {i}/{len(probes)} {mark} {probe.probe_id} ({res.n_tokens} tok): "
                f"{res.response[:60]!r}",
                file=sys.stderr,
                flush=True,
            )
    return results


def build_report(
    lm: LoadedModel, results: Sequence[ProbeResult], settings: dict, threshold: float = DEFAULT_THRESHOLD
) -> dict:
    """The JSON document: per-head scores, retrieval heads, per-family scores, per-probe outcomes."""
    L, H = lm.ctl.num_layers, lm.ctl.num_heads
    scores, n_ok = aggregate(results, L, H)
    families = {}
    for fam in sorted({r.probe.family for r in results}):
        sub = [r for r in results if r.probe.family == fam]
        fam_scores, fam_ok = aggregate(sub, L, H)
        families[fam] = {"probes": len(sub), "retrieved": fam_ok, "scores": _matrix(fam_scores)}
    heads = retrieval_heads(scores, threshold)
    probes = [
        {
            "id": r.probe.probe_id,
            "family": r.probe.family,
            "n_tokens": r.n_tokens,
            "needle_tokens": r.needle_tokens,
            "retrieved": r.retrieved,
            "success_value": _r(r.success_value),
            "response": r.response,
            "max_head_score": _r((r.hits / r.needle_tokens).max()),
            **r.probe.meta,
        }
        for r in results
    ]
    return {
        "schema": SCHEMA,
        "model": {k: lm.info[k] for k in sorted(lm.info)},
        "settings": settings,
        "probes_sha256": hashlib.sha256(
            json.dumps([[p.text, p.needle] for p in (r.probe for r in results)]).encode()
        ).hexdigest(),
        "num_layers": L,
        "num_heads": H,
        "num_probes": len(results),
        "num_retrieved": n_ok,
        "threshold": threshold,
        "retrieval_heads": heads,
        "summary": summarize(scores, threshold),
        "scores": _matrix(scores),
        "families": families,
        "probes": probes,
    }


def _matrix(scores: np.ndarray) -> list[list[float]]:
    return [[_r(x) for x in row] for row in scores]


def summarize(scores: np.ndarray, threshold: float) -> dict:
    flat = np.sort(scores.ravel())[::-1]
    n = flat.size
    return {
        "num_heads_total": int(n),
        "num_retrieval_heads": int((flat > threshold).sum()),
        "fraction_retrieval_heads": _r((flat > threshold).mean()),
        "fraction_below_0.01": _r((flat < 0.01).mean()),
        "median_score": _r(np.median(flat)),
        "max_score": _r(flat[0]),
        "top10_mean": _r(flat[:10].mean()),
    }


def load_report(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise NeedlesError(
            f"cannot read head scores {path}: {exc}", fix="pass a JSON written by `needles heads`"
        ) from None
    if data.get("schema") != SCHEMA or "scores" not in data:
        raise NeedlesError(f"{path} is not a `needles heads` scores file", fix="pass a JSON written by `needles heads`")
    return data


def scores_of(report: dict) -> np.ndarray:
    return np.asarray(report["scores"], dtype=float)


# ----------------------------------------------------------------------------------- outputs
def write_json_atomic(path: Path, data: dict) -> None:
    atomic_io.write_json_atomic(path, data, indent=1)


def write_heatmap(report: dict, path: Path, title: str | None = None) -> None:
    """Layer x head heatmap of the retrieval scores; retrieval heads are outlined."""
    try:
        import matplotlib
    except ImportError:
        raise NeedlesError("the heatmap needs matplotlib", fix="pip install 'lm-eval-needles[plots]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = scores_of(report)
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * H + 2.5), max(4.0, 0.22 * L + 1.5)))
    im = ax.imshow(
        scores,
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=max(0.2, float(scores.max())),
        interpolation="nearest",
        origin="lower",
    )
    for h in report["retrieval_heads"]:
        ax.add_patch(plt.Rectangle((h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    model = Path(str(report["model"].get("model", ""))).name
    adapter = report["model"].get("adapter")
    default_title = f"Retrieval scores: {model}" + (f" + {Path(adapter).name}" if adapter else "")
    ax.set_title(title or default_title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"retrieval score (red: > {report['threshold']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    # Fixed metadata so the same scores give the same PNG bytes.
    fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def format_heads(report: dict, limit: int | None = None) -> str:
    lines = [
        f"{len(report['retrieval_heads'])} retrieval heads (score > {report['threshold']}) of "
        f"{report['num_layers']}x{report['num_heads']}; {report['num_retrieved']}/{report['num_probes']} "
        "probes retrieved"
    ]
    for h in report["retrieval_heads"][:limit]:
        lines.append(f"  L{h['layer']:>2} H{h['head']:>2}  {h['score']:.3f}")
    return "\n".join(lines)
