"""The three sides of bench_finetune_long.py, each run inside its own child process (one side, one length).

A child writes one JSON result: steps, seconds of the training loop, real tokens, per-step losses, final loss
(mean of the last 10), the longest sequence, and on CUDA ``torch.cuda.max_memory_allocated``. Peak RSS is
read by the parent from ``wait4`` (the whole child, model loading included, the same for every side).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import bench_finetune as bf

# TRL 1.16's correct long-sequence settings (SFTConfig overrides). With batch 1 both put one document in a row
# (no padding at all); packing's max_length is the run's L, so bfd cannot merge two near-L documents either.
TRL_LONG = {
    "padding_free": {"padding_free": True},
    "packing_bfd": {"packing": True, "packing_strategy": "bfd"},
}
EVAL_METADATA = {"lengths": [128], "num_samples": 2, "depths": None}  # needles' leakage check, kept tiny


def warmup_steps(steps: int) -> int:
    """needles' warmup (round(5% of steps)) in whole steps, so the Trainer sides warm up identically."""
    return int(round(0.05 * steps))


def context_for(path: str, length: int) -> dict | None:
    """The context section needles writes for L: YaRN (factor ceil(L / native)) past the native window only."""
    from harness_ext.core import rope

    native = rope.rope_window(rope.read_config_json(path) or {})
    return {"length": length, "rope": {"type": "yarn"}} if native and length > native else None


def examples(spec: dict) -> tuple[str, Any, list]:
    """The run's documents (token ids identical to what needles generates from the same data options)."""
    path, tok, exs = bf.examples_for(spec["model"], [spec["length"] - spec["margin"]], spec["steps"], 0)
    longest = max(map(len, exs))
    if longest > spec["length"]:
        raise ValueError(f"a document has {longest} tokens, over L={spec['length']}: raise --margin")
    return path, tok, exs


def lora_model(path: str, context: dict | None) -> Any:
    """bench_finetune.lora_model with the run's RoPE config (the same as needles loads past the window)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from harness_ext.finetune.context import extended_config, plan_context

    config = extended_config(path, plan_context(context, path)) if context else None
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", **({"config": config} if config else {})
    )
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **bf.LORA))


def run_needles(spec: dict) -> dict:
    from harness_ext.core.errors import NeedlesError
    from harness_ext.finetune.config import FinetuneConfig
    from harness_ext.finetune.modeling import resolve_model
    from harness_ext.finetune.recipe import finetune

    context = context_for(resolve_model(spec["model"]), spec["length"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig(
            model=spec["model"],
            output_dir=tmp,
            data={"num_samples": spec["steps"], "seed": 0, "lengths": [spec["length"] - spec["margin"]]},
            eval_metadata=EVAL_METADATA,
            lora_r=bf.LORA["r"],
            lora_alpha=bf.LORA["lora_alpha"],
            lora_dropout=bf.LORA["lora_dropout"],
            target_modules=bf.LORA["target_modules"],
            learning_rate=spec["lr"],
            batch_size=1,
            epochs=1,
            batching="grouped",
            warmup_ratio=0.05,
            gradient_checkpointing=spec["gc"],
            context=context or {},
        )
        try:
            manifest = finetune(cfg, progress=False)
        except NeedlesError as e:  # e.g. a document past the window: say it, as the other sides would fail too
            raise ValueError(str(e)) from e
        history = json.loads((Path(tmp) / "train_log.json").read_text())
    seconds = history[-1]["elapsed_s"]
    real = sum(h["tokens"] for h in history)
    return {"steps": len(history), "seconds": seconds, "real_tokens": real, "tokens_per_s": real / seconds,
            "losses": [h["loss"] for h in history], "final_loss": manifest["final_loss"],
            "longest": manifest["data"]["sequence_length"], "data_sha256": manifest["data"]["data_sha256"],
            "gc_used": manifest["training"]["gradient_checkpointing"], "correct": True}  # fmt: skip


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    path, tok, exs = examples(spec)
    extra = dict(TRL_LONG[spec["trl_setting"]])
    if extra.get("packing"):
        extra["max_length"] = spec["length"]
    rows = [{"input_ids": e.input_ids, "completion_mask": [0] * e.n_prompt + [1] * (len(e) - e.n_prompt)}
            for e in exs]  # fmt: skip
    model = lora_model(path, context_for(path, spec["length"]))
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"max_length": None, "completion_only_loss": True, "dataset_num_proc": None, **extra}
        args = bf.trainer_args(SFTConfig, tmp, 1, spec["lr"], spec["gc"], warmup_steps(spec["steps"]), **kw)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        first = next(iter(trainer.get_train_dataloader()))
        per_row = int((first["position_ids"][0] == 0).sum()) if "position_ids" in first else 1
        leak = None
        if per_row > 1:  # two documents share a row: their loss must equal the loss of each alone
            batch = {k: first[k].to(trainer.model.device) for k in ("input_ids", "labels", "position_ids")}
            leak = bf.check_isolation(trainer.model, batch)
        result = bf.timed_train(trainer)
        seen = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
    real = sum(len(e) for e in exs)
    correct = (leak is None or leak < 1e-3) and (not seen or seen[-1] >= real) and result["steps"] == spec["steps"]
    return {**result, "real_tokens": real, "tokens_per_s": real / result["seconds"], "longest": max(map(len, exs)),
            "docs_per_row": per_row, "isolation_error": leak, "correct": correct}  # fmt: skip


def run_baseline(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    path, tok, exs = examples(spec)
    model = lora_model(path, context_for(path, spec["length"]))
    if spec["gc"]:
        model.enable_input_require_grads()  # the Trainer does this for peft too; explicit, as in needles
    ds = Dataset.from_list(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in exs]
    )
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as tmp:
        args = bf.trainer_args(
            TrainingArguments, tmp, 1, spec["lr"], spec["gc"], warmup_steps(spec["steps"]), remove_unused_columns=False
        )
        result = bf.timed_train(Trainer(model=model, args=args, train_dataset=ds, data_collator=collator))
    real = sum(len(e) for e in exs)
    return {**result, "real_tokens": real, "tokens_per_s": real / result["seconds"], "longest": max(map(len, exs)),
            "correct": result["steps"] == spec["steps"]}  # fmt: skip


def child_main(spec: dict, out: Path) -> int:
    """Run one side; the result (or the error) goes to ``out`` as JSON."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    try:
        result = {"needles": run_needles, "trl": run_trl, "baseline": run_baseline}[spec["side"]](spec)
    except (Exception, MemoryError) as e:  # noqa: BLE001 - a failed run is a row of the table, not a crash
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    result["process_s"] = time.perf_counter() - t0
    result["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    out.write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":  # not a command: bench_finetune_long.py runs it through --child
    sys.exit("run benchmarks/bench_finetune_long.py")
