"""The finetuning configuration: the ``FinetuneConfig`` dataclass, its YAML loading and its validation.

Every field carries its command-line flag in ``dataclasses.field`` metadata (see
:func:`harness_ext.finetune.options.option`):
help text, flag name, choices, argument group and numeric bounds. ``harness_ext.finetune.args``
turns that metadata into argparse flags and :func:`check_bounds` into checks, so a new option is
one line here. YAML keys are the field names; ``data`` holds the training-data family (``family``: kv,
the default, or synth_mdqa; :mod:`harness_ext.finetune.families`) and its knobs: KVSpec fields
(``harness_ext/tasklib/kv_generator.py``) or SynthSpec fields (``harness_ext/tasklib/synth_mdqa.py``),
whose flags come from :class:`DataOptions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.options import check_bounds, flag_names, option  # noqa: F401 - public names here too

DEFAULT_LR = {"lora": 2e-4, "full": 5e-6}  # full: the paper's Mistral recipe (2 epochs, batch 16)
BATCHING_MODES = ("grouped", "padded", "packed")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel with the package
# training-data generators (harness_ext.finetune.families)
DATA_FAMILIES = ("kv", "synth_mdqa", "musique", "summhay", "passkey")
# answer: the assistant turn only (learn the task); all: every token of prompt and answer, a language-modelling
# loss over the whole long document, as Position Interpolation, YaRN and LongLoRA train an extended window
LOSS_ON = ("answer", "all")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # accelerate's trackers (harness_ext.finetune.tracking)

GROUP_DATA = "training data (same generator as the kv_retrieval or synth_mdqa tasks)"
GROUP_EVAL = "evaluation set (its documents are never trained on)"
GROUP_LORA = "LoRA"
GROUP_OPTIM = "optimisation"
GROUP_OUTPUTS = "checkpoints and outputs"
GROUP_CONTEXT = "context extension (train and serve past the model's native window; docs/extension.md)"
# theta: a new base frequency only; dynamic is named so that its refusal can say why (finetune/context.py)
ROPE_TYPES = ("yarn", "linear", "dynamic", "llama3", "theta")
# Above this many tokens in the longest example, gradient checkpointing is on unless set: activations grow
# linearly with the sequence (attention's scores too, without a fused kernel), and past ~2K tokens they outweigh
# a LoRA's weights and optimizer state on the models this project trains; below it recomputation costs ~30%.
GRADIENT_CHECKPOINTING_ABOVE = 2048


@dataclass
class DataOptions:
    """Flags for keys of ``FinetuneConfig.data`` (None: not given, the YAML or the default stands)."""

    variant: str | None = option(choices=("simple", "multisubkey"))
    answer_template: bool | None = option(negatable=True)
    num_samples: int | None = option(
        help="documents per length (default 350)", ge=1, label="data.num_samples", fix="use e.g. --num-samples 350"
    )
    seed: int | None = option(
        flag="--data-seed",
        help="generator seed (default 0; the kv_retrieval eval tasks use 1000)",
        ge=0,
        label="data.seed",
        fix="use e.g. --data-seed 0",
    )
    lengths: list[int] | None = option(help="prompt token targets (default 256)")
    num_dicts: int | None = option(
        help="fixed dictionary count instead of token targets",
        ge=1,
        label="data.num_dicts",
        fix="use e.g. --num-dicts 10",
    )
    depths: list[float] | None = option(help="gold depths in [0,1] (default: uniform)")
    # the synth_mdqa family (num_samples, seed and lengths above apply to it too)
    family: str | None = option(
        flag="--data-family", choices=DATA_FAMILIES, help="kv (default), synth_mdqa, musique, summhay or passkey"
    )
    cell: str | None = option(flag="--data-cell", help="the family's cell (see `needles data list families`)")
    num_documents: int | None = option(
        help="synth_mdqa: documents per prompt (default 10)", ge=1, label="data.num_documents", fix="use e.g. 10"
    )
    positions: list[int] | None = option(help="synth_mdqa: 1-based gold positions (default 1 5 10)")
    facts_per_document: int | None = option(
        help="synth_mdqa: facts per record/entity (default 3)", ge=1, label="data.facts_per_document", fix="use 1..6"
    )
    reference_needles: bool | None = option(negatable=True, help="synth_mdqa natural_in_prose: add Wu et al.'s needles")
    target: str | None = option(
        flag="--data-target",
        choices=("answer", "sentence"),
        help="synth_mdqa: the trained reply: the first answer (default) or the gold document's sentence holding it",
    )


def _positive(key: str, example: str) -> dict:
    """Bounds of a positive RoPE number, its label and fix (for ``option``)."""
    return {"gt": 0, "label": f"context.rope.{key}", "fix": f"use e.g. {example}"}


@dataclass
class ContextOptions:
    """Flags for keys of ``FinetuneConfig.context`` (None: not given); ``key`` is where each goes in it."""

    length: int | None = option(
        flag="--context-length",
        help="target window in tokens: train and serve up to it",
        gt=0,
        label="context.length",
        fix="set the target window, e.g. --context-length 16384",
    )
    rope_type: str | None = option(
        key="rope.type", help="RoPE change: yarn, linear, llama3, theta (dynamic is training-free only: refused)"
    )
    rope_factor: float | None = option(
        key="rope.factor",
        help="scaling factor (default ceil(length / native window))",
        ge=1,
        label="context.rope.factor",
        fix="use factor >= 1, or drop it: the default is ceil(length / native window)",
    )
    rope_theta: float | None = option(
        key="rope.theta",
        help="base frequency (default: the model's; for type theta the NTK-aware theta x s^(d/(d-2)))",
        **_positive("theta", "8.0e6 (ProLong's, 64K)"),
    )
    rope_original_max_position_embeddings: int | None = option(
        key="rope.original_max_position_embeddings",
        help="yarn, llama3: pretraining window (default the model's)",
        **_positive("original_max_position_embeddings", "the model's declared window (the default)"),
    )
    rope_attention_factor: float | None = option(
        key="rope.attention_factor", help="yarn", **_positive("attention_factor", "1.0, or drop it")
    )
    rope_beta_fast: float | None = option(
        key="rope.beta_fast", help="yarn (transformers' default 32)", **_positive("beta_fast", "32")
    )
    rope_beta_slow: float | None = option(
        key="rope.beta_slow", help="yarn (transformers' default 1)", **_positive("beta_slow", "1")
    )
    rope_low_freq_factor: float | None = option(
        key="rope.low_freq_factor", help="llama3 (default 1, Llama 3.1's)", **_positive("low_freq_factor", "1")
    )
    rope_high_freq_factor: float | None = option(
        key="rope.high_freq_factor", help="llama3 (default 4, Llama 3.1's)", **_positive("high_freq_factor", "4")
    )


def default_data(family: str = "kv") -> dict:
    """The data defaults of a family (synth_mdqa: families.synth_train_spec fills SynthSpec's)."""
    if family != "kv":
        return {"family": family}
    return {"variant": "simple", "num_samples": 350, "seed": 0, "lengths": [256]}


@dataclass
class FinetuneConfig:
    """Everything a run depends on. YAML keys and --flags use these names."""

    model: str = option("smollm2", "local HF folder, downloaded hub id, or smollm2 (default)")
    output_dir: str = option(
        "outputs/finetune", "output folder (default outputs/finetune)", flag=("-o", "--output-dir")
    )
    method: str = option("lora", choices=tuple(DEFAULT_LR))
    # training data: the family (default kv) and its knobs (KVSpec or SynthSpec fields); KV depths default to uniform
    data: dict = option(factory=default_data, group=GROUP_DATA, flag=None, expand=DataOptions)
    system_prompt: str | None = option(
        None, "system message for every training example (default none)", group=GROUP_DATA
    )
    # the evaluation set this run will be scored on: its documents must not be trained on
    eval_tasks: list[str] = option(
        factory=lambda: ["kv_retrieval_simple"], help="default kv_retrieval_simple", group=GROUP_EVAL
    )
    eval_metadata: dict = option(
        factory=dict, help="lm_eval --metadata JSON, e.g. '{\"lengths\":[256]}'", group=GROUP_EVAL
    )
    lora_r: int = option(16, group=GROUP_LORA, gt=0, label="LoRA rank r", fix="use e.g. --lora-r 16")
    lora_alpha: float = option(32, group=GROUP_LORA, gt=0, fix="use e.g. --lora-alpha 32 (often 2 x rank)")
    lora_dropout: float = option(0.05, group=GROUP_LORA, ge=0.0, lt=1.0, fix="use e.g. 0.05")
    target_modules: list[str] = option(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], group=GROUP_LORA)
    epochs: float = option(2.0, group=GROUP_OPTIM, gt=0, fix="use e.g. --epochs 2")
    max_steps: int | None = option(None, group=GROUP_OPTIM, ge=1, fix="drop --max-steps to train by epochs")
    learning_rate: float | None = option(
        None,
        "default 2e-4 (LoRA), 5e-6 (full)",
        flag="--lr",
        group=GROUP_OPTIM,
        gt=0,
        fix="use e.g. 2e-4 for LoRA, 5e-6 for full finetuning",
    )
    batch_size: int = option(4, "micro-batch per device (default 4)", group=GROUP_OPTIM, ge=1)
    grad_accum: int = option(1, group=GROUP_OPTIM, ge=1)
    warmup_ratio: float = option(0.05, group=GROUP_OPTIM, ge=0.0, lt=1.0, fix="use e.g. 0.05")
    lr_scheduler: str = option("cosine", group=GROUP_OPTIM, choices=LR_SCHEDULERS)
    weight_decay: float = option(0.0, group=GROUP_OPTIM, ge=0.0)
    max_grad_norm: float = option(1.0, group=GROUP_OPTIM, ge=0.0, fix="use e.g. 1.0 (0 turns clipping off)")
    gradient_checkpointing: bool | None = option(
        None,
        "default: on when the longest example exceeds --gradient-checkpointing-above or, on a CPU, when the largest "
        "micro-batch would not fit in 70%% of the available memory without it (harness_ext/finetune/memory.py)",
        group=GROUP_OPTIM,
        negatable=True,
    )
    batching: str = option("grouped", group=GROUP_OPTIM, choices=BATCHING_MODES)
    # packed: tokens per row (default batch_size * longest example)
    pack_tokens: int | None = option(None, group=GROUP_OPTIM, ge=1)
    max_length: int | None = option(None, "refuse data longer than this (never truncates)", group=GROUP_OPTIM, ge=1)
    seed: int = option(0, "LoRA init, dropout and batch order (default 0)", group=GROUP_OPTIM, ge=0)
    loss_on: str = option(
        "answer",
        "answer (default): the loss on the assistant answer only; all: on every token of the prompt and the answer, "
        "a language-modelling loss over the whole long document (how PI, YaRN and LongLoRA train a longer window)",
        group=GROUP_OPTIM,
        choices=LOSS_ON,
    )
    attn_implementation: str = option("sdpa", "sdpa (default), eager, flash_attention_2", group=GROUP_OPTIM)
    trust_remote_code: bool = option(False, group=GROUP_OPTIM)
    save_every: int = option(0, "checkpoint every N steps", group=GROUP_OUTPUTS, ge=0)
    keep_checkpoints: int = option(2, group=GROUP_OUTPUTS, ge=1)
    resume: bool = option(False, "continue from the latest checkpoint", group=GROUP_OUTPUTS)
    stop_after_steps: int | None = option(
        None, "end this session after N steps (checkpointed)", group=GROUP_OUTPUTS, ge=1
    )
    merge: bool = option(False, "also save the merged model", group=GROUP_OUTPUTS)
    # no argparse choices: a bad name gets the NeedlesError of validate_hparams, with its fix line
    report_to: list[str] = option(
        factory=lambda: ["none"],
        help="training-log trackers: none (default), tensorboard, wandb, trackio; loss and learning rate "
        "of every step, files under OUTPUT_DIR/runs (tensorboard --logdir OUTPUT_DIR/runs)",
        group=GROUP_OUTPUTS,
    )
    # context extension (harness_ext.finetune.context): {length, rope: {type, factor, theta, ...}}
    context: dict = option(
        factory=dict,
        help='JSON, e.g. \'{"length": 16384, "rope": {"type": "yarn"}}\' (the flags above set its keys)',
        flag="--context",
        group=GROUP_CONTEXT,
        expand=ContextOptions,
    )
    gradient_checkpointing_above: int = option(
        GRADIENT_CHECKPOINTING_ABOVE,
        f"tokens (default {GRADIENT_CHECKPOINTING_ABOVE}): longer examples turn gradient checkpointing on",
        group=GROUP_OPTIM,
        ge=1,
        fix="use e.g. --gradient-checkpointing-above 2048",
    )
    log_every: int = option(1, flag=None, ge=1)

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """A config from YAML-style values; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NeedlesError(f"unknown finetune option(s) {unknown}", fix=f"use options among {sorted(known)}")
        return cls(**values)

    def lr(self) -> float:
        """The learning rate in use: the configured one, or the method's default."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]


def packaged_config(name: str) -> Path:
    """A config file shipped inside the package (``harness_ext/finetune/configs/NAME``)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise NeedlesError(f"no packaged finetune config {name!r}", fix=f"use one of {shipped}")
    return path


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file, or a NeedlesError naming the file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NeedlesError(f"cannot read the config {path}: {exc}", fix="pass a readable YAML file") from None
    if not isinstance(values, dict):
        raise NeedlesError(f"{path} is not a mapping of options", fix="write `key: value` lines")
    return values


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> FinetuneConfig:
    """Defaults < YAML file < explicit overrides (CLI flags). ``data`` dicts merge key by key; a family
    given only on the command line starts from that family's defaults, not the KV ones."""
    values: dict = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if key == "context" and isinstance(value, dict) and isinstance(values.get("context"), dict):
            values["context"] = merge_nested(values["context"], value)
        elif key == "data" and isinstance(value, dict):
            given = values.get("data")
            base = dict(given or default_data(str(value.get("family", "kv"))))
            base.update(value)
            values["data"] = base
        else:
            values[key] = value
    return FinetuneConfig.from_dict(values)


def merge_nested(base: dict, update: dict) -> dict:
    """``update`` over ``base``, dicts merged key by key at every depth (a flag sets one key of a YAML mapping)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def validate_data(data: dict) -> None:
    """The numeric bounds of the training-data options (the KV generator checks the rest)."""
    if not isinstance(data, dict):
        raise NeedlesError(f"data={data!r} is not a mapping", fix="write data: {num_samples: 350, lengths: [256]}")
    names = {f.name for f in dataclasses.fields(DataOptions)}
    check_bounds(DataOptions(**{k: v for k, v in data.items() if k in names}))


def validate_context(context: Any) -> None:
    """The numeric bounds of the context section (harness_ext.finetune.context checks it against the model)."""
    if not context:
        return
    if not isinstance(context, dict):
        raise NeedlesError(
            f"context={context!r} is not a mapping", fix="write context: {length: 16384, rope: {type: yarn}}"
        )
    rope = context.get("rope") if isinstance(context.get("rope"), dict) else {}
    names = {f.name for f in dataclasses.fields(ContextOptions)}
    values = {f"rope_{k}": v for k, v in rope.items() if f"rope_{k}" in names and k != "type"}
    check_bounds(ContextOptions(length=context.get("length"), **values))


def validate_hparams(cfg: FinetuneConfig) -> None:
    """Checks that need no model: fail before loading anything."""
    validate_data(cfg.data)
    validate_context(cfg.context)
    if cfg.method not in DEFAULT_LR:
        raise NeedlesError(f"unknown method {cfg.method!r}", fix="use method lora or full")
    if cfg.method == "lora" and not cfg.target_modules:
        raise NeedlesError("no LoRA target modules", fix="use e.g. --target-modules q_proj k_proj v_proj o_proj")
    check_bounds(cfg, skip_groups=() if cfg.method == "lora" else (GROUP_LORA,))  # LoRA options matter only for LoRA
    if cfg.loss_on not in LOSS_ON:
        raise NeedlesError(f"unknown loss_on {cfg.loss_on!r}", fix=f"use one of {list(LOSS_ON)}")
    if cfg.batching not in BATCHING_MODES:
        raise NeedlesError(f"unknown batching {cfg.batching!r}", fix=f"use one of {list(BATCHING_MODES)}")
    if isinstance(cfg.report_to, str) or not isinstance(cfg.report_to, (list, tuple)):
        raise NeedlesError(f"report_to={cfg.report_to!r} is not a list", fix="write e.g. report_to: [tensorboard]")
    unknown = [t for t in cfg.report_to if t not in REPORT_TO]
    if unknown or ("none" in cfg.report_to and len(cfg.report_to) > 1):
        raise NeedlesError(
            f"report_to={cfg.report_to} is not `none` or a list of trackers",
            fix="use --report-to none, or any of tensorboard wandb trackio",
        )
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise NeedlesError(
            f"unknown lr_scheduler {cfg.lr_scheduler!r}", fix="use cosine, linear, constant or constant_with_warmup"
        )
