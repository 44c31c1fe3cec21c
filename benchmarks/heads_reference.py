"""What both retrieval-head benchmarks share (bench_heads.py and its ``--interleaved`` floor, bench_heads_floor.py):
the reference method's probe loop (Wu et al.), the warm-up pass and the machine-speed line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEEDLES_SHARED_DATA", REPO.parent / "shared" / "data"))
EXTRA_TOKENS = 24  # needles heads' default --extra-tokens


# ---------------------------------------------------------------------------------------- reference
def reference_probe(model, tokenizer, ids: list[int], span: tuple[int, int], max_new: int, stop: set[int]):
    """Wu et al.'s loop for one probe: (copy-paste counts, per-head score, reply token ids)."""
    import numpy as np
    import torch

    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    needle_start, needle_end = span
    prompt_ids = torch.tensor(ids)
    score = [[0.0] * heads for _ in range(layers)]
    counts = np.zeros((layers, heads), dtype=np.int64)
    output: list[int] = []
    with torch.no_grad():
        past, inp = reference_prefill(model, prompt_ids), prompt_ids[-1]
        for _ in range(max_new):
            out = model(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
            past = out.past_key_values
            inp = out.logits[0, -1].argmax()
            for layer in range(layers):
                for head in range(heads):
                    values, idx = out.attentions[layer][0][head][-1].topk(1)
                    for _v, i in zip(values, idx):
                        if needle_start <= i < needle_end and inp.item() == prompt_ids[i].item():
                            score[layer][head] += 1 / (needle_end - needle_start)
                            counts[layer, head] += 1
                            break
            token = inp.item()
            if token in stop:
                break
            output.append(token)
            if "\n" in tokenizer.decode([token]):
                break
    return counts, np.array(score), output


def reference_prefill(model, prompt_ids):
    """The reference's prefill (its own function so that --profile shows its share): SDPA over all but the
    last prompt token, logits for every position included; leaves the model in eager mode for decoding."""
    model.set_attn_implementation("sdpa")
    q_outputs = model(input_ids=prompt_ids[None, :-1], use_cache=True)
    model.set_attn_implementation("eager")
    return q_outputs.past_key_values


def warm_up(model) -> None:
    """One short forward pass: pages the (memory-mapped) weights in, so the memory figures are detection's own."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))


def machine_speed() -> str:
    """``python ../shared/tools/machine_speed.py``'s line (GFLOP/s and a Python loop), to print beside the times."""
    tool = SHARED.parent / "tools" / "machine_speed.py"
    if not tool.is_file():
        return f"machine speed: {tool} not found"
    proc = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, check=False)
    return (proc.stdout.strip() or proc.stderr.strip()[-200:]).splitlines()[-1]
