"""Training memory on a CPU: what the largest micro-batch of a run needs, estimated once the model is loaded and
before the first step, so that gradient checkpointing turns on where the run would not fit without it, and a run
that would not fit with it either is refused with the fix (exit 2) instead of being killed by the kernel hours in
(a kill is all a CPU run gets: Linux's OOM killer sends SIGKILL, which no Python code sees).

The estimate counts what backward keeps: per decoder layer, activations that grow with the tokens of a micro-batch
(``rows x width``); the 4-D attention mask transformers builds for padded or packed rows (``rows x width^2``,
which dominates past ~10K tokens a row); with eager attention, its weights (``rows x heads x width^2`` per layer;
torch's CPU sdpa kernel keeps none). Gradient checkpointing keeps each layer's input and recomputes one layer at a
time. The factors were fitted to measured steps of two model shapes; tests/finetune/test_memory.py measures a
step again and checks the estimate against it.

On a GPU the rule of ``--gradient-checkpointing-above`` applies alone: running out of GPU memory raises an error
there rather than a kill, and CUDA's attention kernels differ from the CPU's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.long_sequences import too_long_without_checkpointing

# Fitted (least squares) to the peak resident memory of single LoRA steps, fp32, sdpa, on a CPU: SmolLM2-135M-Instruct
# at 512-4,096 tokens a micro-batch and a 2-layer 64-wide Llama at 4,096-32,768 (all within 12 %):
# bytes kept per token and decoder layer, in units of (hidden + intermediate) x element size
ACTIVATION_FACTOR = 10.1
# bytes per token that do not grow with the model (positions, masks, RoPE tables)
PER_TOKEN = 3554
# bytes per row x width^2: the 4-D attention mask transformers builds for padded or packed rows (sdpa keeps a
# second copy for backward; gradient checkpointing recomputes it)
MASK_BYTES, MASK_BYTES_CHECKPOINTED = 9.1, 4.5
# checkpointing keeps each layer's input (in units of hidden x element size; fitted to the same steps and to the
# real-cell finetune's 5.4 GB) and recomputes one layer at a time, whose activations and their gradients it holds
CHECKPOINT_INPUT_FACTOR = 8.0
# eager attention keeps its weights (rows x heads x width^2 per layer): about 2.5 copies (the 2-layer Llama, 2 x
# 2,048-4,096 tokens: 1,177 MB measured at 4,096, 1,131 estimated)
EAGER_ATTENTION_COPIES = 2.5
# the share of the available memory a run may plan to use: the allocator fragments over hours of steps of varying
# shapes (the real cell's finetune: about 21 GB estimated for its largest batch, killed at 24.1 GB resident)
USABLE_SHARE = 0.7
MIB = 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """The largest micro-batch's estimated peak (MiB) with and without checkpointing, and the decision."""

    rows: int
    width: int
    without_mib: int
    with_mib: int
    available_mib: int | None
    source: str
    checkpointing: bool
    reason: str

    def describe(self) -> str:
        return (
            f"gradient checkpointing on: {self.reason} (largest micro-batch {self.rows} x {self.width} tokens, about "
            f"{self.without_mib / 1024:.1f} GiB without it, {self.with_mib / 1024:.1f} GiB with it; "
            f"{(self.available_mib or 0) / 1024:.1f} GiB available)"
        )

    def to_json(self) -> dict:
        return {
            "largest_micro_batch": {"rows": self.rows, "width": self.width},
            "estimated_peak_mib": {"without_checkpointing": self.without_mib, "with_checkpointing": self.with_mib},
            "available_mib": self.available_mib,
            "available_from": self.source,
            "gradient_checkpointing": self.checkpointing,
            "reason": self.reason,
        }


def _dims(conf: Any) -> tuple[int, int, int, int, int]:
    """(layers, hidden, intermediate, attention heads, vocabulary) of a transformers decoder config."""
    text = getattr(conf, "text_config", None) or conf
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    return layers, hidden, inter, heads, vocab


def activation_bytes(
    conf: Any, rows: int, width: int, logits: int, checkpointing: bool, element: int = 4, eager: bool = False
) -> int:
    """What backward keeps for one micro-batch of ``rows x width`` tokens with ``logits`` positions scored."""
    layers, hidden, inter, heads, vocab = _dims(conf)
    tokens = rows * width
    layer = ACTIVATION_FACTOR * tokens * (hidden + inter) * element
    attention = EAGER_ATTENTION_COPIES * rows * heads * width * width * element if eager else 0.0
    head = 3 * logits * vocab * 4 + PER_TOKEN * tokens  # logits, their fp32 copy and log-softmax
    if checkpointing:
        kept = CHECKPOINT_INPUT_FACTOR * layers * tokens * hidden * element
        return int(kept + 2 * (layer + attention) + MASK_BYTES_CHECKPOINTED * rows * width * width + head)
    return int(layers * (layer + attention) + MASK_BYTES * rows * width * width + head)


def micro_batch_shapes(examples: list, plan: list[list[int]], batching: str) -> set:
    """The distinct (rows, width, scored positions) of the plan's micro-batches, as ``data.collate`` shapes them."""
    shapes = set()
    for ids in plan:
        lengths = [len(examples[i]) for i in ids]
        answers = [len(examples[i]) - examples[i].n_unlabelled for i in ids]
        if batching == "packed":
            shapes.add((1, sum(lengths), sum(answers)))
        else:
            shapes.add((len(ids), max(lengths), len(ids) * (max(answers) + 1)))
    return shapes


def available_memory() -> tuple[int | None, str]:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's limit minus its usage if smaller."""
    forced = os.environ.get("NEEDLES_MEMORY_LIMIT_MB")
    if forced:
        return int(float(forced) * MIB), "NEEDLES_MEMORY_LIMIT_MB"
    best, source = None, "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            m = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        if m:
            best, source = int(m.group(1)) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit != "max" and (best is None or int(limit) - used < best):
            best, source = int(limit) - used, "cgroup memory.max"
    except (OSError, ValueError):
        pass
    return best, source


def smaller_batches_fix(suggest_checkpointing: bool) -> str:
    """The fix for a micro-batch that does not fit: the same batch in smaller pieces, or shorter data."""
    hint = "--gradient-checkpointing (the same weights, slower), " if suggest_checkpointing else ""
    return (
        f"use {hint}a smaller --batch-size with a larger --grad-accum (the same batch: e.g. --batch-size 1 "
        "--grad-accum 4), or --max-length to refuse longer data"
    )


def plan_memory(
    conf: Any,
    shapes: set,
    configured: bool | None,
    by_length: bool,
    trainable: int = 0,
    processes: int = 1,
    eager: bool = False,
) -> MemoryPlan:
    """Checkpointing on or off for an fp32 CPU run, or a NeedlesError when its largest micro-batch cannot fit.

    ``configured``: the user's --[no-]gradient-checkpointing (None: decide); ``by_length``: the
    --gradient-checkpointing-above rule's answer; ``trainable``: parameters with gradients and AdamW moments
    (3 fp32 copies each, allocated at the first step); ``processes``: training processes sharing this machine."""
    optimizer = 3 * 4 * trainable

    def peak(shape: tuple, on: bool) -> int:
        return activation_bytes(conf, shape[0], shape[1], shape[2], on, 4, eager) + optimizer

    worst = {on: max(shapes, key=lambda s: peak(s, on)) for on in (False, True)}
    need = {on: peak(worst[on], on) for on in (False, True)}
    available, source = available_memory()
    budget = None if available is None else USABLE_SHARE * available / max(processes, 1)
    if configured is not None:
        on, reason = bool(configured), "set by --[no-]gradient-checkpointing"
    elif by_length:
        on, reason = True, "an example is longer than --gradient-checkpointing-above"
    elif budget is not None and need[False] > budget:
        on, reason = True, "the largest micro-batch would not fit in the available memory without it"
    else:
        on, reason = False, "the largest micro-batch fits without it"
    rows, width = worst[on][0], worst[on][1]
    if budget is not None and need[on] > budget and os.environ.get("NEEDLES_MEMORY_CHECK") != "0":
        shared = f", shared by {processes} processes" if processes > 1 else ""
        raise NeedlesError(
            f"the largest micro-batch ({rows} x {width} tokens) needs about {need[on] / 2**30:.1f} GiB "
            f"{'with' if on else 'without'} gradient checkpointing, more than the {budget / 2**30:.1f} GiB this "
            f"run may use ({USABLE_SHARE:.0%} of {available / 2**30:.1f} GiB available by {source}{shared}): the "
            "kernel would kill the run when it reaches that batch",
            fix=smaller_batches_fix(not on and need[True] <= budget) + "; NEEDLES_MEMORY_CHECK=0 trains anyway",
        )
    return MemoryPlan(
        rows,
        width,
        int(need[False] / MIB),
        int(need[True] / MIB),
        None if available is None else int(available / MIB),
        source,
        on,
        reason,
    )


def out_of_memory(
    exc: BaseException, step: int, shape: tuple[int, int], device: Any, checkpointing: bool
) -> NeedlesError | None:
    """The ``needles: error`` for torch's out-of-memory error at a training step (a GPU's, or a CPU allocator's where
    the kernel does not kill the process first); None for any other error, which propagates as it is."""
    import torch

    text = str(exc).strip()
    if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return NeedlesError(
        f"out of memory on {device} at step {step}, micro-batch {shape[0]} x {shape[1]} tokens: {first}",
        fix=smaller_batches_fix(not checkpointing) + ". The checkpoints so far are kept: --resume continues from the "
        "newest with the same options (--gradient-checkpointing may be added)",
    )


def plan_run_memory(cfg: Any, model: Any, examples: list, plan: list[list[int]], processes: int) -> MemoryPlan:
    """:func:`plan_memory` for a recipe's loaded (LoRA-wrapped) model, training examples and micro-batch plan."""
    return plan_memory(
        model.config,
        micro_batch_shapes(examples, plan, cfg.batching),
        cfg.gradient_checkpointing,
        too_long_without_checkpointing(cfg, max(len(e) for e in examples)),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        processes,
        eager=cfg.attn_implementation == "eager",
    )
