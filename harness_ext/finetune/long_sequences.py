"""Training long sequences: when gradient checkpointing turns on, what a run measures per training length
(tokens/s, peak memory), and the refusal of sequence parallelism the training loop does not do."""

from __future__ import annotations

import re
import time
from typing import Any

from harness_ext.core.errors import NeedlesError


def use_gradient_checkpointing(cfg: Any, longest: int) -> bool:
    """The configured switch, or (unset) on when the longest example exceeds ``gradient_checkpointing_above``."""
    if cfg.gradient_checkpointing is not None:
        return bool(cfg.gradient_checkpointing)
    return too_long_without_checkpointing(cfg, longest)


def too_long_without_checkpointing(cfg: Any, longest: int) -> bool:
    """The length rule: the longest example exceeds ``gradient_checkpointing_above`` tokens."""
    return longest > cfg.gradient_checkpointing_above


def length_bucket(tokens: int) -> int:
    """The power of two a step's longest sequence rounds up to (the manifest's training length)."""
    return 1 << max(int(tokens) - 1, 1).bit_length()


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(r"VmHWM:\s+(\d+)", f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM, so each step's peak RSS is its own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class LengthMeter:
    """Tokens/s and peak memory per training length: CUDA peak allocation on a GPU, peak RSS on CPU (VmHWM reset
    at each step; where it cannot be reset, the process's peak so far, marked as such)."""

    def __init__(self, device: Any = None):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.rows: dict[int, dict] = {}
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak_per_step"
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif not _reset_peak_rss():
            self.kind = "rss_peak_of_process"
        self._t0 = time.perf_counter()

    def stop(self, longest: int, tokens: int) -> None:
        seconds = time.perf_counter() - self._t0
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            kib = _vm_hwm_kib()
            if kib is None:
                import resource

                kib, self.kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_peak_of_process"
            peak = kib * 1024
        row = self.rows.setdefault(length_bucket(longest), {"steps": 0, "tokens": 0, "seconds": 0.0, "peak": 0})
        row["steps"] += 1
        row["tokens"] += int(tokens)
        row["seconds"] += seconds
        row["peak"] = max(row["peak"], int(peak))
        row["longest"] = max(row.get("longest", 0), int(longest))

    def summary(self) -> dict:
        """``{"up_to_N": {steps, tokens, seconds, tokens_per_second, peak_memory_mb, longest_sequence}}``."""
        out = {}
        for bucket, r in sorted(self.rows.items()):
            out[f"up_to_{bucket}"] = {
                "steps": r["steps"],
                "tokens": r["tokens"],
                "seconds": round(r["seconds"], 3),
                "tokens_per_second": round(r["tokens"] / r["seconds"], 1) if r["seconds"] else None,
                "peak_memory_mb": round(r["peak"] / 2**20, 1),
                "memory": self.kind,
                "longest_sequence": r["longest"],
            }
        return out


def refuse_sequence_parallel(environ: Any = None, on_gpu: bool = False) -> None:
    """Refuse an accelerate launch with context or sequence parallelism (``parallelism_config`` cp_size or
    sp_size > 1, e.g. examples/accelerate/fsdp2_context_parallel.yaml) before accelerate builds its device mesh."""
    import os

    env = os.environ if environ is None else environ
    if str(env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false")).lower() != "true":
        return
    sizes = {k: int(env.get(f"PARALLELISM_CONFIG_{k.upper()}_SIZE", "1") or 1) for k in ("cp", "sp")}
    split = {k: v for k, v in sizes.items() if v > 1}
    if not split:
        return
    what = ", ".join(f"{k}_size={v}" for k, v in split.items())
    if not on_gpu:
        raise NeedlesError(
            f"the accelerate config asks for sequence parallelism ({what}), which needs CUDA GPUs: torch's context "
            "parallel shards attention over NCCL, and this machine has none",
            fix="train on one process (long examples fit through gradient checkpointing, on above "
            "--gradient-checkpointing-above tokens, and --batch-size 1), or run the config on a GPU node",
        )
    raise NeedlesError(
        f"the accelerate config asks for sequence parallelism ({what}), which the needles training loop does not "
        "do yet: its answer-only loss reads the last positions of each sequence, which context parallelism "
        "splits over ranks",
        fix="shard the model instead (examples/accelerate/fsdp.yaml) with gradient checkpointing and --batch-size 1",
    )
