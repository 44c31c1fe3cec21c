"""The study config of ``needles study``: a base model, training variants (cells of the data-family grid plus the
real-data baseline), shared finetune settings, target tasks, head detection / knockout / patching options, seeds.

YAML::

    name: smollm2_transfer
    model: smollm2
    reference_variant: real                       # the real-data variant whose heads the others are compared with
    finetune: {recipe: smollm2_kv_lora.yaml, max_steps: 80}               # FinetuneConfig keys, every variant
    variants:                                                             # each: FinetuneConfig overrides
      - {name: real, finetune: {data: {family: synth_mdqa, cell: real}}}
      - {name: symbolic_kv, finetune: {data: {family: synth_mdqa, cell: symbolic_kv}}}
    targets:                                                              # scored with real lm_eval
      - {task: mdqa_sweep, metric: best_subspan_em}
      - {task: niah_single, metric: niah_acc}
    metadata: {mdqa_num_documents: 10}                                    # lm_eval --metadata
    backend: vllm                                                         # or hf (transformers, no vLLM)
    heads: {probes: [niah, kv], lengths: [512]}                           # `needles heads` options
                                                  # heads: false: no head steps (finetune, eval, report only)
    knockout: {eval_lengths: [512]}                                       # `needles heads --knockout` options
    patching: {sets: [intersection, complement, random], site: result}    # `needles heads patch` options
    k: 10                                                                 # K of top-K / random-K
    seeds: [0]                                                            # one finetune per variant and seed
    in_distribution: {documents: 60}            # each run on held-out documents of its own training family

Option keys of ``heads``/``knockout``/``patching`` are the flags of ``needles heads`` / ``needles heads patch``
with ``_`` for ``-`` (``eval_lengths`` is ``--eval-lengths``); ``random`` and ``top`` in ``patching.sets`` take K.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.workflow.config_file import (
    check_known_keys,
    check_strings,
    config_error,
    in_distribution_of,
    load_config,
)

BACKENDS = ("vllm", "hf")
EXECUTORS = ("local", "ray")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# keys of the option mappings: the flags of the `needles heads` commands they become
HEADS_OPTIONS = (
    "probes", "lengths", "depths", "kv_lengths", "kv_depths", "kv_samples", "kv_seed", "kv_answer_template",
    "mdqa_metadata", "needles", "extra_tokens", "threshold", "dtype", "chat_template", "probe_batch", "qa_metadata",
)  # fmt: skip
EVAL_OPTIONS = (
    "task", "eval_lengths", "eval_depths", "eval_samples", "eval_seed", "eval_max_new_tokens", "kv_answer_template",
    "needles", "dtype", "chat_template", "qa_metadata",
)  # fmt: skip
KNOCKOUT_OPTIONS = (*EVAL_OPTIONS, "draws", "batch_size")
PATCHING_OPTIONS = (*EVAL_OPTIONS, "draws", "sets", "site", "continuation", "threshold")
DEFAULT_SETS = ("intersection", "complement", "random")
BASE = "base"  # the base model's eval (step eval:base, folder OUT/base/): no variant may take the name


@dataclass(frozen=True)
class Variant:
    """One training variant: its name and the FinetuneConfig keys it changes (``data: {family, cell}``...)."""

    name: str
    finetune: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A downstream task the variants are scored on, with the per-sample metric that is their score."""

    task: str
    metric: str
    filter: str = "none"
    label: str = ""
    # the share of documents base and a finetuned run disagree on, from a pilot: the planned MDE uses it instead of
    # independent errors (finetunes of one model share most errors, so the worst case overstates the n needed)
    discordance: float | None = None

    @property
    def name(self) -> str:
        return self.label or self.task

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


@dataclass
class StudyConfig:
    name: str
    model: str
    variants: list[Variant]
    reference_variant: str
    targets: list[Target]
    finetune: dict = field(default_factory=dict)  # FinetuneConfig keys shared by every variant ("recipe" too)
    metadata: dict = field(default_factory=dict)  # lm_eval --metadata of the targets
    seeds: list[int] = field(default_factory=lambda: [0])  # finetune seed (and draw seed) of each run
    backend: str = "vllm"
    max_model_len: int = 4096
    limit: int | None = None  # lm_eval --limit
    gen_kwargs: str | None = None  # lm_eval --gen_kwargs
    batch_size: int = 1  # lm_eval --batch_size of the hf backend (vLLM takes every request at once)
    on_gpu: bool = False  # vLLM's GPU defaults, and a GPU request for every model step under Ray
    heads: dict | bool = field(default_factory=dict)  # False: no detection, recall, knockout, patching, correlation
    knockout: dict = field(default_factory=dict)
    patching: dict = field(default_factory=dict)
    k: int = 10
    draws: int = 5
    bootstrap_iters: int = 10000
    executor: str = "local"
    in_distribution: dict = field(default_factory=dict)  # {documents, enabled}: harness_ext.study.in_distribution

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_steps(self) -> bool:
        """Whether the study detects, compares, knocks out and patches retrieval heads (``heads: false``: it
        finetunes, scores and reports only, e.g. a diagnosis of the finetunes themselves)."""
        return self.heads is not False

    @property
    def reference(self) -> Variant:
        return next(v for v in self.variants if v.name == self.reference_variant)


KIND = "study config"  # how errors name the file


def _fail(path: str, problem: str, fix: str) -> NeedlesError:
    return config_error(KIND, path, problem, fix)


def _mapping(path: str, where: str, raw: object, fix: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} is not a mapping", fix)
    return raw


def _int(path: str, key: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _fail(path, f"{key} {value!r} is not a whole number >= {lo}", f"fix `{key}:`, e.g. {key}: {max(lo, 1)}")
    return value


def _variant(path: str, i: int, raw: object) -> Variant:
    where = f"variants[{i}]"
    fix = "write `- {name: NAME, finetune: {data: {family: synth_mdqa, cell: CELL}}}`"
    raw = _mapping(path, where, raw, fix)
    unknown = sorted(set(raw) - {"name", "finetune"})
    if unknown:
        raise _fail(path, f"{where} has unknown key(s) {unknown}", "a variant has `name` and `finetune` only")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(path, f"{where} needs a name of letters, digits, _ . - (got {name!r})", fix)
    return Variant(name, dict(_mapping(path, f"{where}.finetune", raw.get("finetune"), fix)))


def _target(path: str, i: int, raw: object) -> Target:
    where = f"targets[{i}]"
    fix = "write `- {task: LM_EVAL_TASK, metric: METRIC}` (e.g. {task: niah_single, metric: niah_acc})"
    raw = _mapping(path, where, raw, fix)
    check_known_keys(KIND, path, raw, Target, where)
    check_strings(KIND, path, raw, ("task", "metric"), where, fix)
    psi = raw.get("discordance")
    if psi is not None and (isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0 < psi <= 1):
        raise _fail(
            path,
            f"{where}.discordance must be a share of documents in (0, 1] (got {psi!r})",
            "give the pilot's discordant share, e.g. `discordance: 0.29` for 7 of 24, or leave it out",
        )
    return Target(**raw)


def _options(path: str, key: str, raw: object, allowed: tuple[str, ...]) -> dict:
    values = _mapping(path, key, raw, f"write `{key}: {{option: value}}`")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise _fail(path, f"{key} has unknown option(s) {unknown}", f"use options among {sorted(set(allowed))}")
    return dict(values)


def study_from_dict(values: object, path: str = "<dict>") -> StudyConfig:
    """A validated study config; every problem names the key and the fix."""
    if not isinstance(values, dict):
        raise _fail(path, "is not a mapping", "write `key: value` lines (see docs/study.md)")
    check_known_keys(KIND, path, values, StudyConfig)
    check_strings(KIND, path, values, ("name", "model"))
    if not _NAME.match(values["name"]):
        raise _fail(path, f"name {values['name']!r} is not a folder-safe name", "use letters, digits, _ . -")
    raw_variants = values.get("variants")
    if not isinstance(raw_variants, list) or len(raw_variants) < 2:
        raise _fail(
            path,
            "needs at least two variants (the real-data reference and one synthetic cell)",
            "add `variants:` with `- {name: real, finetune: {...}}` and one entry per synthetic cell",
        )
    variants = [_variant(path, i, raw) for i, raw in enumerate(raw_variants)]
    names = [v.name for v in variants]
    if BASE in names:
        raise _fail(path, f"a variant is named {BASE!r}, the name of the base model's scores", "rename the variant")
    if len(set(names)) != len(names):
        raise _fail(path, f"variant names repeat: {names}", "give every variant its own name")
    ref = values.get("reference_variant")
    if ref not in names:
        raise _fail(
            path,
            f"reference_variant {ref!r} is not one of the variants {names}",
            "set `reference_variant:` to the real-data variant's name",
        )
    raw_targets = values.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise _fail(path, "needs a non-empty targets list", "add `targets:` with `- {task: TASK, metric: METRIC}`")
    targets = [_target(path, i, raw) for i, raw in enumerate(raw_targets)]
    labels = [t.name for t in targets]
    if len(set(labels)) != len(labels):
        raise _fail(path, f"target names repeat: {labels}", "give repeated tasks a distinct `label`")
    seeds = values.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds):
        raise _fail(path, f"seeds {seeds!r} is not a list of distinct seeds", "e.g. seeds: [0] or seeds: [0, 1, 2]")
    for s in seeds:
        _int(path, "seeds", s, 0)
    for key in ("backend", "executor"):
        choices = BACKENDS if key == "backend" else EXECUTORS
        value = values.get(key, choices[0])
        if value not in choices:
            raise _fail(path, f"{key} {value!r} is unknown", f"use {key}: " + " or ".join(choices))
    for key, lo in (("max_model_len", 64), ("batch_size", 1), ("k", 1), ("draws", 1), ("bootstrap_iters", 100)):
        if key in values:
            _int(path, key, values[key], lo)
    if values.get("limit") is not None:
        _int(path, "limit", values["limit"], 1)
    if values.get("gen_kwargs") is not None and not isinstance(values["gen_kwargs"], str):
        raise _fail(path, "gen_kwargs is not a string", "e.g. gen_kwargs: max_gen_toks=32")
    if not isinstance(values.get("on_gpu", False), bool):
        raise _fail(path, "on_gpu is not true or false", "write on_gpu: true")
    for key in ("finetune", "metadata"):
        _mapping(path, key, values.get(key), f"write `{key}: {{...}}`")
    heads = values.get("heads")
    if heads is False:
        given = [key for key in ("knockout", "patching") if values.get(key)]
        if given:  # they act on detected heads: with none detected they would be silently ignored
            raise _fail(
                path,
                f"heads: false runs no head steps, but {' and '.join(given)} options are given",
                f"drop {', '.join(f'`{g}:`' for g in given)}, or give `heads:` its detection options",
            )
    else:
        heads = _options(path, "heads", heads, HEADS_OPTIONS)
    patching = _options(path, "patching", values.get("patching"), PATCHING_OPTIONS)
    sets = patching.get("sets", list(DEFAULT_SETS))
    if not isinstance(sets, list) or not sets or not all(isinstance(s, str) and s for s in sets):
        raise _fail(
            path, f"patching.sets {sets!r} is not a list of sets", "e.g. sets: [intersection, complement, random]"
        )
    in_distribution = in_distribution_of(KIND, path, values)  # the held-out check of each run's training family
    return StudyConfig(
        **{
            **values,
            "in_distribution": in_distribution,
            "variants": variants,
            "targets": targets,
            "seeds": list(seeds),
            "finetune": dict(values.get("finetune") or {}),
            "metadata": dict(values.get("metadata") or {}),
            "heads": heads,
            "knockout": _options(path, "knockout", values.get("knockout"), KNOCKOUT_OPTIONS),
            "patching": patching,
        }
    )


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML (safe loader)."""
    return load_config(KIND, path, study_from_dict, "pass a study YAML file (see docs/study.md)")


def plain(cfg: StudyConfig) -> dict:
    """The config as YAML-ready values, without the executor (a run-time choice, not part of the study)."""
    d = cfg.to_dict()
    d.pop("executor")
    d["targets"] = [
        {k: v for k, v in t.items() if v not in ("", None) and (k, v) != ("filter", "none")} for t in d["targets"]
    ]
    return {k: v for k, v in d.items() if v is not None}
