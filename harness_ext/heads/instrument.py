"""Attention capture and head knockout: one extra attention implementation for transformers' models.

It is registered with transformers' ``AttentionInterface`` (so it works for any causal LM whose attention
goes through that interface, a peft-wrapped one included). It delegates to SDPA unless a layer is being
recorded (decode steps: argmax position per head) or has knocked-out heads (their pre-softmax logits set
to a constant, i.e. uniform attention over the visible positions, as the reference implementations do).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from harness_ext.core.errors import NeedlesError
from harness_ext.heads.scores import Head

ATTN_IMPL = "needles_heads"


class HeadControl:
    """Per-model switchboard read by the attention function: what to record, which heads to knock out."""

    def __init__(self, modules: list[torch.nn.Module], num_heads: int) -> None:
        self.modules = modules
        self.num_layers = len(modules)
        self.num_heads = num_heads
        self.recording = False
        self.argmax: list[torch.Tensor | None] = [None] * self.num_layers
        self.knock: dict[int, list[int]] = {}

    def set_knockout(self, heads: Iterable[Head]) -> None:
        """Heads to knock out from now on (validated against the model's grid)."""
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
    def knocked_out(self, heads: Iterable[Head]) -> Iterator[HeadControl]:
        """Knock ``heads`` out for the duration of the ``with`` block."""
        self.set_knockout(heads)
        try:
            yield self
        finally:
            self.knock = {}

    @contextmanager
    def record(self) -> Iterator[HeadControl]:
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


def needles_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
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
