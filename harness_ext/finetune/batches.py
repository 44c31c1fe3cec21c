"""The recipe's micro-batch plan, its DataLoader, and how micro-batches map onto processes.

The plan lists every micro-batch of the run up front (all epochs, deterministic in the seed).
``accelerate.prepare`` shards it round-robin over the processes (no ``split_batches``): with P
processes and G accumulation steps, optimizer step s consumes plan entries
``(s-1)*G*P .. s*G*P-1``, and process r takes entry ``(j)*P + r`` as its j-th micro-batch. So a
P-process run with ``--grad-accum G`` trains on exactly the micro-batches of a one-process run
with ``--grad-accum G*P``, step for step (same global batch).

Each batch carries ``sample_ids`` (indices into the training examples, the order of
``train_docs.jsonl``). Setting ``NEEDLES_FINETUNE_SAMPLE_LOG=DIR`` makes every process append
the ids it trains on to ``DIR/rank-R.jsonl`` (one ``{"step", "micro", "ids"}`` line per
micro-batch): a debugging aid, and how the DDP test observes that ranks see disjoint data. It
is off by default and never writes into the output folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from harness_ext.finetune.data import collate, plan_batches

SAMPLE_LOG_ENV = "NEEDLES_FINETUNE_SAMPLE_LOG"


class PlanSampler:
    """A batch sampler over a precomputed list of micro-batches (all epochs, in order)."""

    def __init__(self, plan: list[list[int]]):
        self.plan = plan

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def plan_run(cfg: Any, lengths: list[int], processes: int) -> tuple[list[list[int]], int]:
    """(micro-batches of the whole run, optimizer steps); each step takes ``grad_accum * processes`` of them."""
    n_epochs = math.ceil(cfg.epochs) if cfg.max_steps is None else 10**6
    per_epoch = len(plan_batches(lengths, cfg.batch_size, cfg.batching, cfg.seed, 0, cfg.pack_tokens))
    micro_per_step = cfg.grad_accum * processes
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.floor(cfg.epochs * per_epoch / micro_per_step))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total_steps * micro_per_step and epoch < n_epochs:
        plan += plan_batches(lengths, cfg.batch_size, cfg.batching, cfg.seed, epoch, cfg.pack_tokens)
        epoch += 1
    plan = plan[: total_steps * micro_per_step]
    return plan, len(plan) // micro_per_step


def plan_loader(examples: list, plan: list[list[int]], batching: str, pad_id: int) -> Any:
    """A DataLoader yielding the collated micro-batches of ``plan``, each with its ``sample_ids``."""
    import torch

    def collate_ids(ids: list[int]) -> dict:
        return {**collate([examples[i] for i in ids], batching, pad_id), "sample_ids": torch.tensor(ids)}

    return torch.utils.data.DataLoader(range(len(examples)), batch_sampler=PlanSampler(plan), collate_fn=collate_ids)


def plan_index(step: int, micro: int, grad_accum: int, processes: int, rank: int) -> int:
    """The plan entry that process ``rank`` trains on at (optimizer step, accumulation micro-step)."""
    return ((step - 1) * grad_accum + micro) * processes + rank


class SampleLog:
    """Per-process record of consumed sample ids, on when ``NEEDLES_FINETUNE_SAMPLE_LOG`` names a folder."""

    def __init__(self, rank: int):
        folder = os.environ.get(SAMPLE_LOG_ENV)
        self.path = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, micro: int, batch: dict) -> None:
        if self.path is None:
            return
        row = {"step": step, "micro": micro, "ids": [int(i) for i in batch["sample_ids"].tolist()]}
        with open(self.path, "a", encoding="utf-8") as f:  # appended line by line: a resumed run continues it
            f.write(json.dumps(row) + "\n")
