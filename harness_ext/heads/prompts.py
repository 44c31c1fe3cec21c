"""A probe (a model input with a known needle span) and how it becomes model input: chat formatting and
the token span that covers the needle's characters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness_ext.core.errors import NeedlesError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def format_input(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None, chat: bool) -> tuple[str, int]:
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


def encode(tokenizer: PreTrainedTokenizerBase, probe: Probe, chat: bool) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the probe and the token span [start, end) covering its needle characters."""
    enc = tokenizer(probe.text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    lo, hi = probe.needle
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < hi and e > lo]
    if not inside:
        raise NeedlesError(f"probe {probe.probe_id}: the needle maps to no token", fix="report this as a bug")
    return list(ids), (inside[0], inside[-1] + 1)
