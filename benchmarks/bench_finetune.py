"""Training throughput: `needles finetune` vs TRL's ``SFTTrainer`` vs a plain transformers Trainer + peft baseline.

Same model, same LoRA config, same chat-formatted documents (the very token ids), loss on the
answer tokens only, same batch size, learning rate, schedule and number of optimizer steps (one
epoch), in one process. The sides:

- baseline: examples with -100 on the prompt labels, ``DataCollatorForSeq2Seq(padding="longest")``,
  random batches, the model's own loss over full-vocabulary logits;
- TRL ``SFTTrainer`` (trl 1.16): the same ids given as a tokenized prompt-completion dataset
  (``input_ids`` + ``completion_mask``, ``completion_only_loss=True``), in each setting of
  ``TRL_SETTINGS``; ``padding_free`` and ``packing`` rows are checked for cross-sample attention
  (their first batch's loss must equal the per-sample loss) and only correct settings can win;
- ``needles finetune``: groups similar lengths (or packs with per-sample position_ids) and computes
  logits only at answer positions.

Throughput counts real tokens (padding excluded) per second of training loop; the final loss is
the mean of the last 10 step losses (the manifest's ``final_loss``), the same for every side.

    .venv/bin/python benchmarks/bench_finetune.py               # SmolLM2-135M, 8 x lengths 128..512
    .venv/bin/python benchmarks/bench_finetune.py --trl padded padding_free --samples 4
    .venv/bin/python benchmarks/bench_finetune.py --mfu llama-1b   # CUDA only: MFU of a random-init model

Decision rule: needles must reach ``RATIO_REQUIRED`` x the fastest correct TRL setting at
equal final loss (within ``--loss-tol``), else the project adopts TRL's SFTTrainer. Exit status 1 when
the rule is not met (or needles is slower than the baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
RATIO_REQUIRED = 1.5
TRL_SETTINGS = {  # SFTConfig overrides; "packing" also gets a max_length that keeps the optimizer step count
    "packing_bfd": {"packing": True, "packing_strategy": "bfd"},
    "padding_free": {"padding_free": True},
    "padding_free+group_by_length": {"padding_free": True, "train_sampling_strategy": "group_by_length"},
    "group_by_length": {"train_sampling_strategy": "group_by_length"},
    "padded": {},
}
# named shapes for the CUDA MFU run (Llama-3.2-1B and Mistral-7B-v0.1 configs), and dense bf16 peaks in TFLOP/s
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}  # fmt: skip
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def examples_for(model: str, lengths: list[int], per_length: int, seed: int):
    from harness_ext.core.tokenizers import load_tokenizer
    from harness_ext.finetune.data import format_docs, generate_docs, train_spec
    from harness_ext.finetune.modeling import resolve_model

    path = resolve_model(model)
    tok = load_tokenizer(path)
    docs = generate_docs(train_spec({"num_samples": per_length, "seed": seed, "lengths": lengths}), tok)
    return path, tok, format_docs(tok, docs)


def lora_model(path: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)  # the LoRA A init; B starts at zero, so step 1 sees the base model on every side
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))


def trainer_args(
    cls, tmp: str, batch_size: int, lr: float, gradient_checkpointing: bool = False, warmup: float = 0.05, **extra
):
    """The optimisation every Trainer-based side shares (needles: cosine, 5% warmup, AdamW, clip 1.0).

    ``warmup``: a ratio below 1, else whole steps (bench_finetune_long passes needles' rounded step count)."""
    import torch

    return cls(
        output_dir=tmp,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,  # transformers 5: a float below 1 is a ratio (rounded up to whole steps)
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=gradient_checkpointing,  # TRL's default is True; needles' is off below 2,048 tokens
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **extra,
    )


def timed_train(trainer) -> dict:
    """Train; seconds of the training loop and the per-step losses from the Trainer's log."""
    from transformers import TrainerCallback

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    out = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    tail = losses[-10:]
    return {"steps": out.global_step, "seconds": clock["end"] - clock["start"], "losses": losses,
            "final_loss": sum(tail) / len(tail)}  # fmt: skip


def run_baseline(path: str, tok, examples, batch_size: int, lr: float, threads: int) -> dict:
    """Plain transformers Trainer + peft, padding each batch to its longest sequence."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.set_num_threads(threads)
    model = lora_model(path)
    ds = Dataset.from_list(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    )
    padded = {"tokens": 0}
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(rows):
        batch = collator(rows)
        padded["tokens"] += batch["input_ids"].numel()
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        args = trainer_args(TrainingArguments, tmp, batch_size, lr, remove_unused_columns=False)
        result = timed_train(Trainer(model=model, args=args, train_dataset=ds, data_collator=collate))
    real = sum(len(e) for e in examples)
    return {**result, "real_tokens": real, "padded_tokens": padded["tokens"], "tokens_per_s": real / result["seconds"]}


def pack_length(examples, steps: int) -> int:
    """The smallest TRL bfd packing length (a multiple of 32) that packs the examples into ``steps`` rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_list([{"input_ids": e.input_ids} for e in examples])
    length = max(max(map(len, examples)), math.ceil(sum(map(len, examples)) / steps / 32) * 32)
    while len(pack_dataset(ds, length, "bfd")) > steps:
        length += 32
    return length


def check_isolation(model, batch) -> float:
    """|loss of a padding-free/packed batch - the same samples' loss one by one|: 0 unless samples see each other."""
    import torch
    import torch.nn.functional as F

    def nll(ids, labels, **kw):
        logits = model(input_ids=ids, use_cache=False, **kw).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")

    ids, labels, pos = batch["input_ids"][:1], batch["labels"][:1], batch["position_ids"][:1]
    starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
    with torch.no_grad():
        whole = nll(ids, labels, position_ids=pos)
        apart = sum(nll(ids[:, a:b], labels[:, a:b]) for a, b in zip(starts, starts[1:]) if b - a > 1)
    return abs(float(whole - apart)) / max(int((labels[:, 1:] != -100).sum()), 1)


def run_trl(path: str, tok, examples, batch_size: int, lr: float, threads: int, setting: str) -> dict:
    """TRL SFTTrainer on the same token ids (tokenized prompt-completion data, loss on the completion)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    extra = dict(TRL_SETTINGS[setting])
    steps = -(-len(examples) // batch_size)
    if extra.get("packing"):  # one packed row per optimizer step, as many steps as the other sides
        extra["max_length"], batch_size = pack_length(examples, steps), 1
    rows = [{"input_ids": e.input_ids, "completion_mask": [0] * e.n_prompt + [1] * (len(e) - e.n_prompt)}
            for e in examples]  # fmt: skip
    model = lora_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"max_length": None, "completion_only_loss": True, "dataset_num_proc": None, **extra}
        args = trainer_args(SFTConfig, tmp, batch_size, lr, **kw)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        leak = None
        if trainer.padding_free:
            first = next(iter(trainer.get_train_dataloader()))
            leak = check_isolation(trainer.model, {k: v.to(trainer.model.device) for k, v in first.items()
                                                   if k in ("input_ids", "labels", "position_ids")})  # fmt: skip
        result = timed_train(trainer)
        tokens = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
    real = sum(len(e) for e in examples)
    return {**result, "real_tokens": real, "tokens_seen": tokens[-1] if tokens else None,
            "tokens_per_s": real / result["seconds"], "isolation_error": leak, "max_length": extra.get("max_length"),
            "correct": (leak is None or leak < 1e-3) and (not tokens or tokens[-1] >= real)}  # fmt: skip


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
        "losses": [h["loss"] for h in history],
        "final_loss": manifest["final_loss"],
    }


def run_mfu(shape: str, seq_len: int, batch_size: int, steps: int, peak_tflops: float | None) -> dict:
    """CUDA only: model FLOPs utilisation of full bf16 training of a randomly initialised model of a named shape.

    FLOPs = (6 * N + 6 * layers * hidden * seq_len) * tokens: the PaLM-paper accounting (N without the
    embedding lookup, with the LM head even when tied) with its attention term 12*L*h*s halved, since causal
    attention computes half the score matrix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("--mfu needs CUDA (no GPU here)")
    name = torch.cuda.get_device_name()
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 4096), use_cache=False)
    cfg._attn_implementation = "sdpa"  # before the model is built: the fused attention kernel
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # random weights: no download
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - emb.numel() + (head.numel() if head is emb else 0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels, allocator
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = batch_size * seq_len * steps
    flops = (6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_len) * tokens
    return {"device": name, "shape": shape, "params_non_embedding": n, "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12, "peak_tflops": peak, "mfu": flops / seconds / 1e12 / peak}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--samples", type=int, default=8, help="documents per length")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--modes", nargs="+", default=["grouped"], choices=["grouped", "packed"])
    ap.add_argument("--trl", nargs="*", default=list(TRL_SETTINGS), choices=list(TRL_SETTINGS), help="TRL settings")
    ap.add_argument("--loss-tol", type=float, default=0.05, help="equal loss: needles <= TRL * (1 + tol)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the runs; report medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--mfu", nargs="*", choices=list(SHAPES), help="CUDA: shapes to measure (default llama-1b)")
    ap.add_argument("--mfu-seq-len", type=int, default=2048)
    ap.add_argument("--mfu-batch", type=int, default=4)
    ap.add_argument("--mfu-steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: a small table)")
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
    # needles first, the baseline last: a run cut short still has the decision-rule sides
    sides = {m: f"needles finetune --batching {m}" for m in args.modes}
    sides.update({f"trl:{s}": f"TRL SFTTrainer {s}" for s in args.trl})
    sides["baseline"] = "Trainer + peft, pad to longest"
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.repeats):
        for key, label in sides.items():
            print(f"[round {r + 1}] {label} ...", file=sys.stderr, flush=True)
            if key == "baseline":
                res = run_baseline(path, tok, examples, args.batch_size, args.lr, threads)
            elif key.startswith("trl:"):
                res = run_trl(path, tok, examples, args.batch_size, args.lr, threads, key[4:])
            else:
                res = run_needles(args.model, data_cfg, args.batch_size, args.lr, key, threads)
            runs[key].append(res)
            print(f"  -> {res['tokens_per_s']:.0f} tokens/s, {res['seconds']:.1f}s, {res['steps']} steps, "
                  f"final loss {res['final_loss']:.4f}", file=sys.stderr, flush=True)  # fmt: skip

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    base = med("baseline", "tokens_per_s")
    print("\n| run | steps | real tokens | seconds | tokens/s | ratio vs baseline | final loss | note |")
    print("|---|---|---|---|---|---|---|---|")
    for key, label in sides.items():
        first = runs[key][0]
        note = f"{first['padded_tokens']} tokens incl. padding" if key == "baseline" else ""
        if first.get("isolation_error") is not None:
            note = f"isolation error {first['isolation_error']:.1e}/token"
        if first.get("max_length"):
            note += f", max_length {first['max_length']}"
        if key.startswith("trl:") and not first["correct"]:
            note += ", NOT CORRECT"
        print(
            f"| {label} | {first['steps']} | {first['real_tokens']} | {med(key, 'seconds'):.1f} | "
            f"{med(key, 'tokens_per_s'):.0f} | {med(key, 'tokens_per_s') / base:.2f}x | "
            f"{med(key, 'final_loss'):.3f} | {note.strip(', ')} |"
        )
    ok = all(med(m, "tokens_per_s") >= base for m in args.modes)
    verdict = {}
    correct = [k for k in sides if k.startswith("trl:") and all(x["correct"] for x in runs[k])]
    if correct and args.modes:
        trl = max(correct, key=lambda k: med(k, "tokens_per_s"))
        ours = max(args.modes, key=lambda m: med(m, "tokens_per_s"))
        ratio = med(ours, "tokens_per_s") / med(trl, "tokens_per_s")
        loss_ok = med(ours, "final_loss") <= med(trl, "final_loss") * (1 + args.loss_tol)
        keep = ratio >= RATIO_REQUIRED and loss_ok
        verdict = {"trl": trl, "needles": ours, "ratio": ratio, "loss_ok": loss_ok, "keep_needles": keep}
        print(
            f"\nfastest correct TRL: {trl}; needles {ours} / TRL = {ratio:.2f}x (rule: >= {RATIO_REQUIRED}x), "
            f"final loss {med(ours, 'final_loss'):.3f} vs {med(trl, 'final_loss'):.3f} "
            f"({'equal or better' if loss_ok else 'worse'} within {args.loss_tol:.0%})\nverdict: "
            + ("keep the needles recipe" if keep else "adopt TRL's SFTTrainer (decision rule not met)")
        )
        ok = ok and keep
    mfu = []
    shapes = args.mfu if args.mfu is not None else (["llama-1b"] if torch.cuda.is_available() else [])
    for shape in shapes:
        mfu.append(run_mfu(shape, args.mfu_seq_len, args.mfu_batch, args.mfu_steps, args.peak_tflops))
        m = mfu[-1]
        print(f"MFU {shape} bf16 on {m['device']}: {m['tokens_per_s']:.0f} tokens/s, {m['tflops']:.1f} TFLOP/s "
              f"of {m['peak_tflops']:.0f} peak = {m['mfu']:.1%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": runs, "verdict": verdict, "mfu": mfu}, indent=2)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
