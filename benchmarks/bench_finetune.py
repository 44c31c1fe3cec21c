"""Training throughput: `needles finetune` vs a plain transformers Trainer + peft baseline.

Same model, same LoRA config, same documents, same number of optimizer steps (one epoch over the
same examples), in one process. The baseline is the usual recipe: examples with -100 on the
prompt labels, ``DataCollatorForSeq2Seq(padding="longest")`` (every batch padded to its longest
sequence), random batches, the model's own loss over full-vocabulary logits. ``needles
finetune`` groups similar lengths (or packs with per-sample position_ids: no attention across
samples) and computes logits only at answer positions.

Throughput counts real tokens (padding excluded) per second of training loop.

    .venv/bin/python benchmarks/bench_finetune.py            # SmolLM2-135M, lengths 128..1024
    .venv/bin/python benchmarks/bench_finetune.py --modes grouped packed --samples 48

Exit status 1 when needles finetune is slower than the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def examples_for(model: str, lengths: list[int], per_length: int, seed: int):
    from harness_ext.core.tokenizers import load_tokenizer
    from harness_ext.finetune.data import format_docs, generate_docs, train_spec
    from harness_ext.finetune.modeling import resolve_model

    path = resolve_model(model)
    tok = load_tokenizer(path)
    docs = generate_docs(train_spec({"num_samples": per_length, "seed": seed, "lengths": lengths}), tok)
    return path, tok, format_docs(tok, docs)


def run_baseline(path: str, tok, examples, batch_size: int, lr: float, threads: int) -> dict:
    """Plain transformers Trainer + peft, padding each batch to its longest sequence."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    ds = Dataset.from_list(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    )
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    padded = {"tokens": 0}

    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(rows):
        batch = collator(rows)
        padded["tokens"] += batch["input_ids"].numel()
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,  # transformers 5: a float below 1 is a ratio
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
        out = trainer.train()
    seconds = clock["end"] - clock["start"]
    real = sum(len(e) for e in examples)
    return {
        "steps": out.global_step,
        "seconds": seconds,
        "real_tokens": real,
        "padded_tokens": padded["tokens"],
        "tokens_per_s": real / seconds,
        "final_loss": out.training_loss,
    }


def run_needles(model: str, examples_cfg: dict, batch_size: int, lr: float, mode: str, threads: int) -> dict:
    import torch

    from harness_ext.finetune.config import FinetuneConfig
    from harness_ext.finetune.recipe import finetune

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig(
            model=model,
            output_dir=tmp,
            data=examples_cfg,
            eval_metadata={"lengths": [128], "num_samples": 2, "depths": None},
            lora_r=LORA["r"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=LORA["lora_dropout"],
            target_modules=LORA["target_modules"],
            learning_rate=lr,
            batch_size=batch_size,
            epochs=1,
            batching=mode,
            pack_tokens=None,
            warmup_ratio=0.05,
        )
        manifest = finetune(cfg, progress=False)
        history = json.loads((Path(tmp) / "train_log.json").read_text())
    seconds = history[-1]["elapsed_s"]
    real = sum(h["tokens"] for h in history)
    return {
        "steps": len(history),
        "seconds": seconds,
        "real_tokens": real,
        "tokens_per_s": real / seconds,
        "final_loss": manifest["final_loss"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--samples", type=int, default=8, help="documents per length")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--modes", nargs="+", default=["grouped"], choices=["grouped", "packed"])
    ap.add_argument("--repeats", type=int, default=1, help="alternate baseline/needles runs; report medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch

    threads = args.threads or torch.get_num_threads()
    data_cfg = {"num_samples": args.samples, "seed": 0, "lengths": args.lengths}
    path, tok, examples = examples_for(args.model, args.lengths, args.samples, 0)
    n = len(examples)
    print(
        f"model {path}\n{n} examples, lengths {min(map(len, examples))}-{max(map(len, examples))} tokens, "
        f"batch {args.batch_size}, {-(-n // args.batch_size)} steps (one epoch), {threads} threads",
        file=sys.stderr,
    )
    runs: dict[str, list[dict]] = {"baseline": [], **{m: [] for m in args.modes}}
    for r in range(args.repeats):
        print(f"[round {r + 1}] baseline (Trainer + peft, pad to longest) ...", file=sys.stderr, flush=True)
        runs["baseline"].append(run_baseline(path, tok, examples, args.batch_size, args.lr, threads))
        for mode in args.modes:
            print(f"[round {r + 1}] needles finetune --batching {mode} ...", file=sys.stderr, flush=True)
            runs[mode].append(run_needles(args.model, data_cfg, args.batch_size, args.lr, mode, threads))

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    base = med("baseline", "tokens_per_s")
    pad = runs["baseline"][0]["padded_tokens"]
    print("\n| run | steps | real tokens | seconds | tokens/s | ratio vs baseline | final loss |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| Trainer + peft, pad to longest ({pad} tokens incl. padding) | {runs['baseline'][0]['steps']} | "
        f"{runs['baseline'][0]['real_tokens']} | {med('baseline', 'seconds'):.1f} | {base:.0f} | 1.00x | "
        f"{med('baseline', 'final_loss'):.3f} |"
    )
    ratios = {}
    for mode in args.modes:
        tps = med(mode, "tokens_per_s")
        ratios[mode] = tps / base
        print(
            f"| needles finetune --batching {mode} | {runs[mode][0]['steps']} | {runs[mode][0]['real_tokens']} | "
            f"{med(mode, 'seconds'):.1f} | {tps:.0f} | {ratios[mode]:.2f}x | {med(mode, 'final_loss'):.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "ratios": ratios}, indent=2))
    return 0 if all(r >= 1.0 for r in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
