"""The finetuning recipe: synthetic KV data in, an adapter (or model) and its eval command out.

One readable workflow in the torchtune-recipe style, a thin layer over transformers + peft +
accelerate:

    config -> validate (before any training) -> data (generate, leakage check, chat format)
           -> model (+ LoRA) -> train (accelerate: 1 CPU, 1 GPU, or many via `accelerate launch`)
           -> save adapter / model (+ merged) -> manifest.json + the lm_eval command that scores it

Distribution, mixed precision, gradient accumulation and checkpoint state are accelerate's
(no home-made distribution code): ``accelerate launch --config_file examples/accelerate/fsdp.yaml
-m harness_ext.finetune --config run.yaml`` runs the same file on many GPUs.

Loss: token-level cross-entropy on the assistant answer only. Logits are computed only where
the loss needs them (``logits_to_keep``): with left padding every answer ends at the last
position, so a 256-token prompt with a 25-token answer projects 26 positions onto the
vocabulary instead of 281.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.atomic_io import write_json_atomic
from harness_ext.errors import NeedlesError
from harness_ext.finetune_data import (
    BATCHING_MODES,
    check_lengths,
    check_no_leakage,
    collate,
    data_summary,
    docs_sha256,
    expand_eval_tasks,
    format_docs,
    generate_docs,
    label_tokens,
    loss_sum,
    plan_batches,
    require_chat_template,
    train_spec,
    write_docs,
)
from kv_tasks.dataset_cache import file_sha256

# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks); lm-eval's default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LR = {"lora": 2e-4, "full": 5e-6}  # full: the paper's Mistral recipe (2 epochs, batch 16)
MANIFEST = "manifest.json"
CPU_LORA_CHUNK = 512  # vLLM max_num_batched_tokens when serving a LoRA adapter on CPU


@dataclass
class FinetuneConfig:
    """Everything a run depends on. YAML keys and --flags use these names."""

    model: str = "smollm2"  # a local HF folder, a (downloaded) hub id, or "smollm2" (embedded)
    output_dir: str = "outputs/finetune"
    method: str = "lora"  # lora | full
    # training data: KVSpec fields (kv_tasks/kv_generator.py); depths default to uniform
    data: dict = field(default_factory=lambda: {"variant": "simple", "num_samples": 350, "seed": 0, "lengths": [256]})
    system_prompt: str | None = None
    # the evaluation set this run will be scored on: its documents must not be trained on
    eval_tasks: list = field(default_factory=lambda: ["kv_retrieval_simple"])
    eval_metadata: dict = field(default_factory=dict)
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # optimisation
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    learning_rate: float | None = None  # None -> 2e-4 (LoRA) / 5e-6 (full)
    batch_size: int = 4  # micro-batch per device
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    batching: str = "grouped"  # grouped | padded | packed
    pack_tokens: int | None = None  # packed: tokens per row (default batch_size * longest example)
    max_length: int | None = None  # optional cap: data longer than this is an error, never truncated
    seed: int = 0  # weight init of LoRA, dropout, batch order
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # checkpoints and outputs
    save_every: int = 0  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after_steps: int | None = None  # end this session early (checkpointed); continue with resume
    merge: bool = False
    log_every: int = 1

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NeedlesError(f"unknown finetune option(s) {unknown}", fix=f"use options among {sorted(known)}")
        return cls(**values)

    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> FinetuneConfig:
    """Defaults < YAML file < explicit overrides (CLI flags). ``data`` dicts merge key by key."""
    import yaml

    values: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise NeedlesError(f"cannot read the config {path}: {exc}", fix="pass a readable YAML file") from None
        if not isinstance(values, dict):
            raise NeedlesError(f"{path} is not a mapping of options", fix="write `key: value` lines")
    for key, value in (overrides or {}).items():
        if key == "data" and isinstance(value, dict):
            base = dict(values.get("data") or FinetuneConfig().data)
            base.update(value)
            values["data"] = base
        else:
            values[key] = value
    return FinetuneConfig.from_dict(values)


# ============================================================================ validation
def validate_hparams(cfg: FinetuneConfig) -> None:
    """Checks that need no model: fail before loading anything."""

    def bad(problem: str, fix: str) -> None:
        raise NeedlesError(problem, fix=fix)

    if cfg.method not in DEFAULT_LR:
        bad(f"unknown method {cfg.method!r}", "use method lora or full")
    if cfg.method == "lora":
        if int(cfg.lora_r) <= 0:
            bad(f"LoRA rank r={cfg.lora_r} must be positive", "use e.g. --lora-r 16")
        if cfg.lora_alpha <= 0:
            bad(f"lora_alpha={cfg.lora_alpha} must be positive", "use e.g. --lora-alpha 32 (often 2 x rank)")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            bad(f"lora_dropout={cfg.lora_dropout} is not in [0, 1)", "use e.g. 0.05")
        if not cfg.target_modules:
            bad("no LoRA target modules", "use e.g. --target-modules q_proj k_proj v_proj o_proj")
    if not cfg.lr() > 0:
        bad(f"learning_rate={cfg.lr()} must be positive", "use e.g. 2e-4 for LoRA, 5e-6 for full finetuning")
    for name in ("batch_size", "grad_accum", "log_every"):
        if int(getattr(cfg, name)) < 1:
            bad(f"{name}={getattr(cfg, name)} must be at least 1", f"set {name} to 1 or more")
    if cfg.max_steps is None and not cfg.epochs > 0:
        bad(f"epochs={cfg.epochs} must be positive", "use e.g. --epochs 2")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad(f"max_steps={cfg.max_steps} must be at least 1", "drop --max-steps to train by epochs")
    if cfg.batching not in BATCHING_MODES:
        bad(f"unknown batching {cfg.batching!r}", f"use one of {list(BATCHING_MODES)}")
    if cfg.save_every < 0 or cfg.keep_checkpoints < 1:
        bad("save_every must be >= 0 and keep_checkpoints >= 1", "e.g. --save-every 50 --keep-checkpoints 2")
    if cfg.lr_scheduler not in {"cosine", "linear", "constant", "constant_with_warmup"}:
        bad(f"unknown lr_scheduler {cfg.lr_scheduler!r}", "use cosine, linear, constant or constant_with_warmup")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        bad(f"warmup_ratio={cfg.warmup_ratio} is not in [0, 1)", "use e.g. 0.05")


def resolve_model(name: str) -> str:
    if name == "smollm2":
        from harness_ext.models import smollm2_path

        return str(smollm2_path())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def model_max_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def linear_module_names(model) -> set[str]:
    """Short names of the linear layers LoRA can target (e.g. q_proj, down_proj)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return names


def check_target_modules(model, targets: list[str]) -> None:
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available and t != "all-linear"]
    if unknown:
        raise NeedlesError(
            f"unknown LoRA target module(s) {unknown} for {type(model).__name__}",
            fix=f"use names among {sorted(available)} (or all-linear)",
        )


# ============================================================================ pieces of the run
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lm-eval-needles", "torch", "transformers", "peft", "accelerate", "lm_eval", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj)


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise NeedlesError(
        f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}",
        fix="train with a smaller rank or score the merged model (--merge)",
    )


def adapter_rank(adapter_dir: Path) -> int:
    """The largest rank in a saved peft adapter (rank_pattern included)."""
    with open(Path(adapter_dir) / "adapter_config.json", encoding="utf-8") as f:
        conf = json.load(f)
    ranks = [int(conf["r"]), *(int(v) for v in (conf.get("rank_pattern") or {}).values())]
    return max(ranks)


def eval_command(
    base: str,
    eval_tasks: list[str],
    eval_metadata: dict,
    max_model_len: int,
    adapter: Path | None = None,
    merged: Path | None = None,
    output_path: Path | None = None,
    on_gpu: bool = False,
) -> list[str]:
    """The lm_eval argv that scores the result with vLLM (adapter via lora_local_path, or merged)."""
    from harness_ext.runner import vllm_model_args

    pretrained = str(merged) if merged else base
    extra = ""
    if adapter is not None and merged is None:
        extra = f"lora_local_path={adapter},max_lora_rank={vllm_lora_rank(adapter_rank(adapter))}"
    if on_gpu:
        args = f"pretrained={pretrained},max_model_len={max_model_len}" + (f",{extra}" if extra else "")
    else:
        if extra:
            # vLLM's CPU LoRA kernels gather one weight copy per token of a prefill chunk: small chunks
            # keep those temporaries in cache (measured here: ~1.8x faster than the default 4096)
            extra += f",max_num_batched_tokens={CPU_LORA_CHUNK}"
        args = vllm_model_args(pretrained, max_model_len, extra)
    cmd = [
        "lm_eval",
        "run",
        "--tasks",
        ",".join(eval_tasks),
        "--model",
        "vllm",
        "--model_args",
        args,
        "--apply_chat_template",
    ]
    if eval_metadata:
        cmd += ["--metadata", json.dumps(eval_metadata, separators=(",", ":"))]
    if output_path is not None:
        cmd += ["--output_path", str(output_path)]
    # --batch_size auto: vLLM gets every request at once (lm_eval's default of 1 is ~10x slower on CPU)
    return cmd + ["--batch_size", "auto", "--log_samples"]


def _scheduler(cfg: FinetuneConfig, optimizer, total_steps: int, processes: int):
    from transformers import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units
    warmup = int(round(cfg.warmup_ratio * total_steps)) * processes
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps * processes
    )


class _Batches:
    """A batch sampler over a precomputed list of micro-batches (all epochs, in order)."""

    def __init__(self, plan: list[list[int]]):
        self.plan = plan

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "needles_state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _config_fingerprint(cfg: FinetuneConfig) -> str:
    """What must not change between a run and its --resume (outputs/checkpoint knobs may)."""
    d = dataclasses.asdict(cfg)
    for key in ("output_dir", "resume", "stop_after_steps", "save_every", "keep_checkpoints", "merge", "log_every"):
        d.pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ============================================================================ the recipe
def load_base(cfg: FinetuneConfig):
    """(resolved model path, its config, its tokenizer); a model without chat template is refused."""
    from transformers import AutoConfig, AutoTokenizer

    base = resolve_model(cfg.model)
    try:
        model_config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise NeedlesError(
            f"cannot load model {cfg.model!r}: {str(exc).splitlines()[0]}",
            fix="pass a local model folder, a downloaded hub id, or smollm2",
        ) from None
    require_chat_template(tokenizer, cfg.model)
    return base, model_config, tokenizer


def prepare_docs(cfg: FinetuneConfig, tokenizer, base: str):
    """Training documents from the KV generator, checked against the evaluation set."""
    spec = train_spec(cfg.data)
    tasks = expand_eval_tasks(cfg.eval_tasks)
    docs = generate_docs(spec, tokenizer)
    leak = check_no_leakage(docs, spec.seed, tasks, cfg.eval_metadata, base)
    return spec, tasks, docs, leak


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Run the whole recipe; returns the manifest (also written to OUTPUT_DIR/manifest.json)."""
    validate_hparams(cfg)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    out = Path(cfg.output_dir).expanduser().resolve()
    on_gpu = torch.cuda.is_available()
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
        "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    )
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed)
    main = accelerator.is_main_process
    say = (lambda msg: print(f"[needles finetune] {msg}", file=sys.stderr, flush=True)) if main else (lambda msg: None)

    # ---- model config, tokenizer, data: everything that can fail does so before training
    base, model_config, tokenizer = load_base(cfg)
    t0 = time.perf_counter()
    spec, tasks, docs, leak = prepare_docs(cfg, tokenizer, base)
    examples = format_docs(tokenizer, docs, cfg.system_prompt)
    seq_len = check_lengths(examples, model_max_length(model_config), cfg.max_length)
    summary = data_summary(examples)
    say(
        f"data: {summary['examples']} examples, {summary['min_len']}-{seq_len} tokens, generated and checked "
        f"against {leak.eval_docs} eval docs of {tasks} in {time.perf_counter() - t0:.1f}s (no overlap)"
    )

    # ---- model
    set_seed(cfg.seed)
    dtype = torch.bfloat16 if (on_gpu and cfg.method == "lora" and mixed == "bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
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
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora":
            model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    # ---- schedule: micro-batches for every epoch, planned up front (deterministic in the seed)
    lengths = [len(e) for e in examples]
    n_epochs = math.ceil(cfg.epochs) if cfg.max_steps is None else 10**6
    plan: list[list[int]] = []
    per_epoch = len(plan_batches(lengths, cfg.batch_size, cfg.batching, cfg.seed, 0, cfg.pack_tokens))
    micro_per_step = cfg.grad_accum * accelerator.num_processes
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.floor(cfg.epochs * per_epoch / micro_per_step))
    epoch = 0
    while len(plan) < total_steps * micro_per_step and epoch < n_epochs:
        plan += plan_batches(lengths, cfg.batch_size, cfg.batching, cfg.seed, epoch, cfg.pack_tokens)
        epoch += 1
    plan = plan[: total_steps * micro_per_step]
    total_steps = len(plan) // micro_per_step

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        examples, batch_sampler=_Batches(plan), collate_fn=lambda b: collate(b, cfg.batching, pad_id)
    )
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr()
    )
    scheduler = _scheduler(cfg, optimizer, total_steps, accelerator.num_processes)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # our batch sampler has no batch_size attribute for DeepSpeed's "auto"
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if cfg.method == "lora":
        _save_only_trainable(accelerator)

    # ---- resume
    fingerprint = _config_fingerprint(cfg)
    start_step, history = 0, []
    if cfg.resume:
        found = _checkpoints(out)
        if not found:
            raise NeedlesError(
                f"--resume: no checkpoint under {out / 'checkpoints'}",
                fix="run without --resume (and with --save-every N) first",
            )
        state = json.loads((found[-1] / "needles_state.json").read_text())
        if state["config_fingerprint"] != fingerprint:
            raise NeedlesError(
                f"--resume: {found[-1]} was written with another configuration",
                fix="resume with the same options (only output/checkpoint options may change)",
            )
        accelerator.load_state(str(found[-1]), strict=False)  # LoRA checkpoints hold only the adapter
        _check_restored(found[-1], model)
        start_step, history = state["step"], state["history"]
        say(f"resumed from {found[-1]} at step {start_step}/{total_steps}")
    elif _checkpoints(out):  # every process checks: a raise on one rank only would hang the others
        raise NeedlesError(f"{out} already holds checkpoints of a run", fix="pass --resume or use a new --output-dir")

    say(
        f"{cfg.method} on {type(accelerator.unwrap_model(model)).__name__} ({n_trainable:,} of {n_total:,} "
        f"parameters trainable), {total_steps} steps x {micro_per_step} micro-batches of {cfg.batch_size}, "
        f"batching={cfg.batching}, {'bf16' if mixed == 'bf16' else 'fp32'} on {accelerator.device}, "
        f"{accelerator.num_processes} process(es)"
    )

    # ---- train
    history = _train(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        start_step,
        total_steps,
        history,
        out,
        fingerprint,
        progress and main,
    )
    accelerator.wait_for_everyone()
    stopped = history[-1]["step"] < total_steps if history else start_step < total_steps
    manifest = _manifest(
        cfg, base, spec, docs, summary, leak, seq_len, n_trainable, n_total, total_steps, history, stopped
    )
    if stopped:
        if main:
            say(f"stopped after step {history[-1]['step']} of {total_steps}; continue with --resume")
        return manifest

    # ---- save: adapter or full model, optional merge, manifest, eval command
    _save_outputs(cfg, accelerator, model, tokenizer, out, base, tasks, manifest, docs, history, leak, on_gpu)
    if main:
        say(f"final loss {manifest['final_loss']:.4f}; outputs in {out}")
        say("score it with:\n  " + manifest["eval_command"])
    return manifest


def _check_restored(path: Path, model) -> None:
    """strict=False must not hide a checkpoint that lacks trainable weights (plain, non-sharded saves)."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return  # FSDP / DeepSpeed write their own (sharded) formats and load them strictly
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if missing:
        raise NeedlesError(
            f"--resume: {path} lacks {len(missing)} trained tensors (e.g. {missing[0]})",
            fix="resume from a checkpoint of the same run, or start again without --resume",
        )


def _save_only_trainable(accelerator) -> None:
    """LoRA checkpoints keep only the adapter weights (the frozen base is not copied each time)."""

    def pre_save(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                keep = {n for n, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(pre_save)


def _train(
    cfg, accelerator, model, optimizer, scheduler, loader, start_step, total_steps, history, out, fingerprint, progress
) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    model.train()
    it = iter(accelerator.skip_first_batches(loader, start_step * cfg.grad_accum) if start_step else loader)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not progress,
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    last_stop = cfg.stop_after_steps + start_step if cfg.stop_after_steps else total_steps
    tokens_seen, t_start = 0, time.perf_counter()
    for step in range(start_step + 1, min(total_steps, last_stop) + 1):
        step_loss, step_tokens, step_labels = 0.0, 0, 0
        for micro in range(cfg.grad_accum):
            batch = next(it)
            # Dropout masks come from (seed, micro-batch, rank) alone, so a resumed run repeats an
            # uninterrupted one exactly (a DataLoader iterator draws from the global RNG when it
            # starts, which happens at a different point after --resume).
            micro_index = (step - 1) * cfg.grad_accum + micro
            torch.manual_seed(cfg.seed * 1_000_003 + micro_index * 1_009 + accelerator.process_index)
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
            step_loss += float(loss.detach()) / cfg.grad_accum
            step_tokens += (
                int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            )
            step_labels += n_labels
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
        history.append(row)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            bar.set_postfix(
                loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}", lr=f"{row['lr']:.2e}"
            )
        if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or (
            step == last_stop and step < total_steps
        ):
            _checkpoint(cfg, accelerator, out, step, history, fingerprint)
    bar.close()
    return history


def _checkpoint(cfg, accelerator, out: Path, step: int, history: list[dict], fingerprint: str) -> None:
    path = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        _write_json(path / "needles_state.json", {"step": step, "history": history, "config_fingerprint": fingerprint})
        for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _manifest(
    cfg, base, spec, docs, summary, leak, seq_len, n_trainable, n_total, total_steps, history, stopped
) -> dict:
    tail = [h["loss"] for h in history[-10:]]
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    tokens = sum(h["tokens"] for h in history)
    return {
        "kind": "needles-finetune",
        "base_model": {"name": cfg.model, "path": base},
        "method": cfg.method,
        "data": {
            "spec": spec.to_json(),
            "documents": len(docs),
            "data_sha256": docs_sha256(docs),
            "tokens": summary,
            "sequence_length": seq_len,
            "system_prompt": cfg.system_prompt,
        },
        "leakage_check": dataclasses.asdict(leak) | {"train_seed": spec.seed, "eval_metadata": cfg.eval_metadata},
        "hyperparameters": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in {"data", "output_dir"}}
        | {"learning_rate": cfg.lr()},
        "parameters": {"trainable": n_trainable, "total": n_total},
        "training": {
            "steps": history[-1]["step"] if history else 0,
            "total_steps": total_steps,
            "stopped_early": stopped,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "first_loss": history[0]["loss"] if history else None,
            "train_seconds_last_session": elapsed,
            "tokens_per_second_last_session": round(tokens / elapsed, 1) if elapsed else None,
        },
        "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        "versions": _versions(),
    }


def eval_max_model_len(seq_len: int, leak_docs_max: int, model_max: int | None) -> int:
    need = max(seq_len, leak_docs_max) + 128  # chat template + generated answer
    length = int(math.ceil(need / 512) * 512)
    return min(length, model_max) if model_max else length


def _save_outputs(
    cfg, accelerator, model, tokenizer, out: Path, base: str, tasks, manifest, docs, history, leak, on_gpu
) -> None:
    main = accelerator.is_main_process
    state = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
    target = out / ("adapter" if cfg.method == "lora" else "model")
    accelerator.unwrap_model(model).save_pretrained(
        target, state_dict=state, is_main_process=main, save_function=accelerator.save
    )
    if main:
        tokenizer.save_pretrained(target)
        merged = merge_adapter(base, target, out / "merged", cfg) if (cfg.merge and cfg.method == "lora") else None
        write_docs(out / "train_docs.jsonl", docs)
        from transformers import AutoConfig

        max_len = eval_max_model_len(
            manifest["data"]["sequence_length"],
            leak.eval_max_tokens,
            model_max_length(AutoConfig.from_pretrained(base)),
        )
        adapter = target if cfg.method == "lora" else None
        model_dir = target if cfg.method == "full" else merged
        argv = eval_command(
            base,
            tasks,
            cfg.eval_metadata,
            max_len,
            adapter=adapter,
            merged=target if cfg.method == "full" else None,
            output_path=out / "eval",
            on_gpu=on_gpu,
        )
        manifest["outputs"] = {
            "dir": str(out),
            "adapter": str(adapter) if adapter else None,
            "model": str(model_dir) if model_dir else None,
            "files": {
                p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.suffix in {".safetensors", ".json"}
            },
        }
        if adapter:
            manifest["outputs"]["lora_rank"] = adapter_rank(adapter)
        manifest["eval_argv"] = argv
        manifest["eval_command"] = shlex.join(argv)
        lines = [manifest["eval_command"]]
        if merged:
            merged_argv = eval_command(
                base, tasks, cfg.eval_metadata, max_len, merged=merged, output_path=out / "eval_merged", on_gpu=on_gpu
            )
            manifest["eval_command_merged"] = shlex.join(merged_argv)
            lines.append("# or, the merged model:\n# " + manifest["eval_command_merged"])
        (out / "eval_command.sh").write_text("#!/bin/sh\n" + "\n".join(lines) + "\n", encoding="utf-8")
        _write_json(out / "train_log.json", history)
        _write_json(out / MANIFEST, manifest)
    accelerator.wait_for_everyone()


def merge_adapter(base: str, adapter: Path, target: Path, cfg: FinetuneConfig) -> Path:
    """base + adapter -> one plain model folder. Done from the saved adapter on the main process, so
    it works the same after FSDP / DeepSpeed training (sharded weights are never merged in place)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``accelerate launch -m harness_ext.finetune --config run.yaml [flags]``."""
    from harness_ext.commands.finetune import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
