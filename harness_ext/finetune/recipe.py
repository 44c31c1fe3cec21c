"""The finetuning recipe: synthetic KV data in, an adapter (or model) and its eval command out.

One readable workflow in the torchtune-recipe style, a thin layer over transformers + peft +
accelerate, as one class with three steps:

    FinetuneRecipe(cfg).setup()   validate (before anything slow), claim the output folder, data
                                  (generate, leakage check, chat format), model (+ LoRA), schedule,
                                  optimizer, accelerate.prepare, --resume
                       .train()   the optimisation loop, checkpoints every --save-every steps
                       .save()    adapter / model (+ merged), manifest.json and the lm_eval command

Distribution, mixed precision, gradient accumulation and checkpoint state are accelerate's
(no home-made distribution code): ``accelerate launch --config_file examples/accelerate/fsdp.yaml
-m harness_ext.finetune --config run.yaml`` runs the same code on many GPUs.

Loss: token-level cross-entropy on the assistant answer only (``loss_on: answer``, the default), or on
every token of prompt and answer (``loss_on: all``: language modelling over the whole long document, the
loss context-extension methods train with). Logits are computed only where the loss needs them
(``logits_to_keep``): with left padding every answer ends at the last position, so a 256-token prompt
with a 25-token answer projects 26 positions onto the vocabulary instead of 281.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from harness_ext.core.atomic_io import write_json_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune import rundir, tracking
from harness_ext.finetune.batches import SampleLog, plan_index, plan_loader, plan_run
from harness_ext.finetune.config import FinetuneConfig, validate_hparams
from harness_ext.finetune.context import context_manifest, extended_config, plan_context
from harness_ext.finetune.data import (
    check_lengths,
    data_summary,
    docs_sha256,
    format_docs,
    label_tokens,
    loss_sum,
    prepare_docs,
    train_spec,
    write_docs,
)
from harness_ext.finetune.long_sequences import LengthMeter, refuse_sequence_parallel, use_gradient_checkpointing
from harness_ext.finetune.manifest import build_manifest
from harness_ext.finetune.memory import out_of_memory, plan_run_memory
from harness_ext.finetune.modeling import (
    check_target_modules,
    load_base,
    merge_adapter,
    model_max_length,
    resolve_model,
)
from harness_ext.finetune.outputs import record_outputs


class FinetuneRecipe:
    """One finetuning run: ``setup()``, ``train()``, ``save()`` (or ``run()`` for all three)."""

    def __init__(self, cfg: FinetuneConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output_dir).expanduser().resolve()
        self.history: list[dict] = []
        self.start_step = 0
        self._lock: rundir.OutputLock | None = None
        self.trackers: list[str] = []

    def say(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[needles finetune] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything that can fail does so here, before the first optimizer step."""
        cfg = self.cfg
        validate_hparams(cfg)
        train_spec(cfg.data)  # the data options and the model's name, before anything is loaded
        # a bad context section fails here too: it is checked against config.json alone
        self.context = plan_context(cfg.context, resolve_model(cfg.model), cfg.model)
        self.trackers = tracking.trackers(cfg.report_to)  # a missing tracker package fails here, before any loading
        import torch
        from accelerate import Accelerator

        self.on_gpu = torch.cuda.is_available()
        refuse_sequence_parallel(on_gpu=self.on_gpu)  # before accelerate builds a device mesh it cannot use
        self.mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if self.on_gpu and torch.cuda.is_bf16_supported() else "no"
        )
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=self.mixed,
            **tracking.accelerator_kwargs(self.trackers, self.out),
        )
        launched = int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1  # torchrun's
        if launched > self.accelerator.num_processes:  # else each process trains alone, on all the data
            raise NeedlesError(
                f"{launched} processes were launched but accelerate runs each on its own (no GPU per process)",
                fix="on CPU, set ACCELERATE_USE_CPU=true for `accelerate launch --multi_gpu` (gloo DDP)",
            )
        # every process checks the folder: a raise on one rank only would leave the others waiting
        self._lock = rundir.OutputLock(self.out, self.accelerator.process_index).acquire()
        rundir.check_output_dir(self.out, cfg.resume)
        self._setup_data()
        self._setup_model()
        self._setup_optimisation()
        self._resume()
        tracking.start(self.accelerator, self.trackers, dataclasses.asdict(cfg))
        a = self.accelerator
        self.say(
            f"{cfg.method} on {type(a.unwrap_model(self.model)).__name__} ({self.n_trainable:,} of "
            f"{self.n_total:,} parameters trainable), {self.total_steps} steps x {self.micro_per_step} micro-batches "
            f"of {cfg.batch_size}, batching={cfg.batching}, {'bf16' if self.mixed == 'bf16' else 'fp32'} on "
            f"{a.device}, {a.num_processes} process(es)"
        )
        if self.context and self.context.changes_rope:
            self.say(self.context.describe())  # every RoPE value, and the rule behind each default

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.base, self.model_config, self.tokenizer = load_base(cfg)
        t0 = time.perf_counter()
        self.spec, self.tasks, self.docs, self.leak = prepare_docs(cfg, self.tokenizer, self.base)
        self.examples = format_docs(self.tokenizer, self.docs, cfg.system_prompt, cfg.loss_on)
        self.window = self.context.window if self.context else model_max_length(self.model_config)
        self.seq_len = check_lengths(self.examples, self.window, cfg.max_length)
        self.checkpointing = use_gradient_checkpointing(cfg, self.seq_len)
        self.plan, self.total_steps = plan_run(cfg, [len(e) for e in self.examples], self.accelerator.num_processes)
        self.memory = None
        self.summary = data_summary(self.examples)
        self.say(
            f"data: {self.summary['examples']} examples, {self.summary['min_len']}-{self.seq_len} tokens, generated "
            f"and checked against {self.leak.eval_docs} eval docs of {self.tasks} in "
            f"{time.perf_counter() - t0:.1f}s (no overlap)"
        )

    def _setup_model(self) -> None:
        import torch
        from accelerate.utils import set_seed
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        set_seed(cfg.seed)
        lora_bf16 = self.on_gpu and cfg.method == "lora" and self.mixed == "bf16"
        model = AutoModelForCausalLM.from_pretrained(
            self.base,
            dtype=torch.bfloat16 if lora_bf16 else torch.float32,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            **({"config": c} if (c := extended_config(self.base, self.context, cfg.trust_remote_code)) else {}),
        )
        model.config.use_cache = False
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            check_target_modules(model, list(cfg.target_modules))
            lora = LoraConfig(
                r=int(cfg.lora_r),
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        if not self.on_gpu:  # a CPU run that outgrows memory is killed, not told: decide before the first step
            self.memory = plan_run_memory(cfg, model, self.examples, self.plan, self.accelerator.num_processes)
            self.checkpointing = self.memory.checkpointing
            if self.checkpointing and cfg.gradient_checkpointing is None:
                self.say(self.memory.describe())
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.method == "lora":
                model.enable_input_require_grads()
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_total = sum(p.numel() for p in model.parameters())
        self.model = model

    def _setup_optimisation(self) -> None:
        import torch
        from transformers import get_scheduler

        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        plan = self.plan
        self.micro_per_step = cfg.grad_accum * accelerator.num_processes
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        loader = plan_loader(self.examples, plan, cfg.batching, pad_id)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr())
        # accelerate steps a prepared scheduler once per process per optimizer step: count in those units
        processes = accelerator.num_processes
        warmup = int(round(cfg.warmup_ratio * self.total_steps)) * processes
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps * processes
        )
        ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None:  # our batch sampler has no batch_size attribute for DeepSpeed's "auto"
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        prepared = accelerator.prepare(model, optimizer, loader, scheduler)
        self.model, self.optimizer, self.loader, self.scheduler = prepared
        if cfg.method == "lora":
            rundir.save_only_trainable(accelerator)

    def _resume(self) -> None:
        self.fingerprint = rundir.config_fingerprint(self.cfg)
        self.data_sha256 = docs_sha256(self.docs)
        if not self.cfg.resume:
            return
        path, state = rundir.latest_state(
            self.out, rundir.resumable_fingerprints(self.cfg), self.accelerator.num_processes, self.data_sha256
        )
        self.accelerator.load_state(str(path), strict=False)  # LoRA checkpoints hold only the adapter
        rundir.check_restored(path, self.accelerator.unwrap_model(self.model))  # saved names lack DDP's "module."
        self.start_step, self.history = state["step"], state["history"]
        self.say(f"resumed from {path} at step {self.start_step}/{self.total_steps}")

    # ------------------------------------------------------------------ train
    def train(self) -> list[dict]:
        """Optimizer steps from ``start_step`` to the end (or ``stop_after_steps``); returns the history."""
        import torch
        from tqdm.auto import tqdm

        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        optimizer, scheduler = self.optimizer, self.scheduler
        start_step, total_steps = self.start_step, self.total_steps
        model.train()
        loader = self.loader
        it = iter(accelerator.skip_first_batches(loader, start_step * cfg.grad_accum) if start_step else loader)
        bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (self.progress and accelerator.is_main_process),
            desc="finetune",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        last_stop = cfg.stop_after_steps + start_step if cfg.stop_after_steps else total_steps
        tokens_seen, t_start = 0, time.perf_counter()
        rank, processes = accelerator.process_index, accelerator.num_processes
        sample_log = SampleLog(rank)
        self.meter = LengthMeter(accelerator.device)
        for step in range(start_step + 1, min(total_steps, last_stop) + 1):
            step_loss, step_tokens, step_labels, longest = 0.0, 0, 0, 0
            self.meter.start()
            for micro in range(cfg.grad_accum):
                batch = next(it)
                longest = max(longest, int(batch["input_ids"].shape[-1]))
                sample_log.record(step, micro, batch)
                # Dropout masks come from (seed, plan entry) alone, so a resumed run repeats an uninterrupted
                # one exactly (a DataLoader iterator draws from the global RNG when it starts, which happens at
                # a different point after --resume), and P processes with --grad-accum G repeat one with G*P.
                index = plan_index(step, micro, cfg.grad_accum, processes, rank)
                torch.manual_seed(cfg.seed * 1_000_003 + index * 1_009)
                try:
                    with accelerator.accumulate(model):
                        n_labels = max(label_tokens(batch), 1)
                        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                        keep = batch["logits_to_keep"]
                        keep = keep.to(accelerator.device) if torch.is_tensor(keep) else keep
                        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
                        loss = loss_sum(logits, batch) / n_labels
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                except RuntimeError as exc:  # torch.OutOfMemoryError is one
                    shape = tuple(batch["input_ids"].shape[-2:])
                    error = out_of_memory(exc, step, shape, accelerator.device, self.checkpointing)
                    if error is None:
                        raise
                    bar.close()  # the error starts on its own line
                    raise error from None
                step_loss += float(loss.detach()) / cfg.grad_accum
                mask = batch.get("attention_mask")
                step_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                step_labels += n_labels
            if processes > 1:  # the step's loss and token counts over all processes, not rank 0's share
                totals = torch.tensor([step_loss, step_tokens, step_labels], dtype=torch.float64)
                totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").tolist()
                step_loss, step_tokens, step_labels = totals[0] / processes, int(totals[1]), int(totals[2])
            self.meter.stop(longest, step_tokens)
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - t_start
            row = {
                "step": step,
                "loss": round(step_loss, 5),
                "lr": scheduler.get_last_lr()[0],
                "tokens": step_tokens,
                "label_tokens": step_labels,
                "elapsed_s": round(elapsed, 2),
            }
            self.history.append(row)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                tracking.log_step(accelerator, self.trackers, row)
                rate = f"{tokens_seen / max(elapsed, 1e-9):.0f}"
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=rate, lr=f"{row['lr']:.2e}")
            periodic = cfg.save_every and step % cfg.save_every == 0
            if (periodic or step == last_stop) and step < total_steps:
                rundir.save_checkpoint(
                    accelerator, self.out, step, self.history, self.fingerprint, cfg.keep_checkpoints, self.data_sha256
                )
        bar.close()
        accelerator.wait_for_everyone()
        return self.history

    # ------------------------------------------------------------------ save
    def manifest(self) -> dict:
        """The run's manifest as it stands (stopped early or finished)."""
        history = self.history
        stopped = history[-1]["step"] < self.total_steps if history else self.start_step < self.total_steps
        manifest = build_manifest(
            self.cfg,
            self.base,
            self.spec,
            self.docs,
            self.summary,
            self.leak,
            self.seq_len,
            (self.n_trainable, self.n_total),
            self.total_steps,
            history,
            stopped,
        )
        manifest = context_manifest(manifest, self.context, getattr(self, "meter", LengthMeter()), self.checkpointing)
        manifest["training"]["memory"] = self.memory.to_json() if self.memory else None
        return manifest

    def save(self) -> dict:
        """Adapter or full model (+ merged), training docs/log, eval commands and manifest; returns the manifest.

        A session stopped early (``stop_after_steps``) saves nothing here: its checkpoint holds the state."""
        cfg, accelerator = self.cfg, self.accelerator
        manifest = self.manifest()
        if manifest["training"]["stopped_early"]:
            self.say(f"stopped after step {self.history[-1]['step']} of {self.total_steps}; continue with --resume")
            return manifest
        main, out = accelerator.is_main_process, self.out
        state = accelerator.get_state_dict(self.model)  # gathers FSDP / ZeRO-3 shards
        target = out / ("adapter" if cfg.method == "lora" else "model")
        accelerator.unwrap_model(self.model).save_pretrained(
            target, state_dict=state, is_main_process=main, save_function=accelerator.save
        )
        if main:
            self.tokenizer.save_pretrained(target)
            merged = None
            if cfg.merge and cfg.method == "lora":
                merged = merge_adapter(self.base, target, out / "merged", cfg.trust_remote_code, self.context)
            write_docs(out / "train_docs.jsonl", self.docs)
            record_outputs(
                manifest,
                cfg,
                self.base,
                self.tasks,
                target,
                merged,
                window=self.window,
                seq_len=self.seq_len,
                eval_max_tokens=self.leak.eval_max_tokens,
                on_gpu=self.on_gpu,
                context=self.context,
            )
            write_json_atomic(out / "train_log.json", self.history)
            write_json_atomic(out / rundir.MANIFEST, manifest)
        accelerator.wait_for_everyone()
        self.say(f"final loss {manifest['final_loss']:.4f}; outputs in {out}")
        self.say("score it with:\n  " + manifest.get("eval_command", ""))
        return manifest

    # ------------------------------------------------------------------ all three
    def run(self) -> dict:
        """setup -> train -> save; the output folder is released however it ends."""
        try:
            self.setup()
            self.train()
            return self.save()
        finally:
            if self.trackers and hasattr(self, "accelerator"):
                tracking.finish(self.accelerator, self.trackers)
            if self._lock is not None:
                self._lock.release()


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Run the whole recipe; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    return FinetuneRecipe(cfg, progress).run()
