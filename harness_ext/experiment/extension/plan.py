"""``needles experiment`` with a context extension (``context`` in its ``finetune``, a target window past the
model's native one): the suite is scored for three variants and compared by length.

- ``base``: the model as it is, served inside its native window, on the suite's lengths that fit there;
- ``training_free``: the same model served with the extension's RoPE (``hf_overrides`` + ``max_model_len``,
  the variant users try first), on every length up to the target;
- ``finetuned``: the model trained past its window with that RoPE, on every length.

Targets must improve over the training-free variant past the native window (what the training added); guards
must not drop by their margin against the base model inside the native window (no regression where the model
already worked). The report (:mod:`harness_ext.experiment.extension.report`) puts the three variants side by
side by length, the native window marked, with each variant's effective context length.

Steps (each resumable, as ``needles experiment``'s): data, pilot, eval_base, eval_training_free, finetune,
eval_finetuned, compare, report.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.run import eval_argv, scored_model
from harness_ext.workflow.suite import ExperimentConfig

# task family -> (its --metadata key of token lengths, its max_gen_toks); families without one (mdqa's fixed
# documents, FLenQA's word counts) are scored whole in every variant and must fit the native window
LENGTH_FAMILIES = {
    "kv_retrieval": ("lengths", 64),
    "niah": ("niah_lengths", 50),
    "synth_mdqa": ("synth_lengths", 100),
    "musique": ("musique_lengths", 32),
    "summhay": ("summhay_lengths", 32),
    "needles_passkey": ("passkey_lengths", 16),
    "needles_long_ppl": ("long_ppl_contexts", 0),  # loglikelihood: its continuation, not a reply (_room)
}
# families scored on plain text: their tasks refuse --apply_chat_template and --system_instruction (text before the
# context would change it), so each variant scores them in a second lm_eval call, into OUT/eval_<variant>_plain.
# Their documents depend on the longest context of the list (long_ppl places each continuation where the longest
# fits), so the base model, served inside its window on fewer contexts, would score other documents: the base
# variant does not score them, and they are targets only (tested against the training-free variant).
PLAIN_FAMILIES = ("needles_long_ppl",)
EVAL_KINDS = ("chat", "plain")
# tokens a chat template adds around a prompt (SmolLM2's system turn is ~30): a length fits a window when it,
# this and the generated tokens do, so the length guard never has to refuse a planned prompt
CHAT_SLACK = 64
PLAN = ("data", "pilot", "eval_base", "eval_training_free", "finetune", "eval_finetuned", "compare", "report")
VARIANTS = ("base", "training_free", "finetuned")


def length_family(task: str) -> str | None:
    """The length family of a suite task (the family itself as a group, or one of its tasks), or None."""
    for family in LENGTH_FAMILIES:
        if task == family or task.startswith(family + "_"):
            return family
    return None


def is_plain(task: str) -> bool:
    """True for a suite task scored without the chat template (:data:`PLAIN_FAMILIES`)."""
    return length_family(task) in PLAIN_FAMILIES


def _room(cfg: ExperimentConfig, family: str) -> int:
    """Tokens a prompt of a given length needs besides it: the continuation of a plain family, else the reply and
    the chat template."""
    if family in PLAIN_FAMILIES:
        return int(cfg.metadata.get("long_ppl_continuation", 128))
    m = re.search(r"max_gen_toks\s*=\s*(\d+)", cfg.gen_kwargs or "")
    return (int(m.group(1)) if m else LENGTH_FAMILIES[family][1]) + CHAT_SLACK


@dataclass(frozen=True)
class ExtensionPlan:
    """The three variants' evaluations: which lengths and tasks each scores, and in which window."""

    native: int  # the window the base model is served with
    target: int  # context.length: the window the two extended variants are served with
    hf_overrides: dict  # the RoPE override of the training-free variant (and of an adapter)
    rope: dict
    inside: dict  # length metadata key -> the lengths that fit the native window
    past: dict  # length metadata key -> the lengths past it
    base_tasks: tuple[str, ...]  # suite names the base model scores (those with a length inside its window)

    def base_metadata(self, metadata: dict) -> dict:
        return {**metadata, **{key: list(lengths) for key, lengths in self.inside.items()}}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def is_extension(ft) -> bool:
    """True when the finetune's ``context`` section extends the window past the native one."""
    from harness_ext.finetune.context import plan_context
    from harness_ext.finetune.modeling import resolve_model

    if not ft.context:
        return False
    ctx = plan_context(ft.context, resolve_model(ft.model), ft.model)
    return ctx is not None and ctx.length > ctx.native


def plan_extension(cfg: ExperimentConfig, ft) -> ExtensionPlan:
    """Split the suite's lengths at the native window and check that the experiment can say something: every
    length-family task names its lengths, each fits the target window, some lie past the native window, and every
    guard has lengths inside it. Every problem is a NeedlesError naming the key and the fix."""
    from harness_ext.finetune.context import plan_context
    from harness_ext.finetune.modeling import resolve_model

    ctx = plan_context(ft.context, resolve_model(ft.model), ft.model)
    assert ctx is not None and ctx.length > ctx.native  # is_extension() chose this path
    where = f"experiment {cfg.name}"
    inside: dict[str, list[int]] = {}
    past: dict[str, list[int]] = {}
    base_tasks = []
    for entry in cfg.suite:
        family = length_family(entry.task)
        if family is None:  # scored whole by every variant: it has to fit the native window (the guard checks)
            base_tasks.append(entry.name)
            continue
        key, _ = LENGTH_FAMILIES[family]
        lengths = cfg.metadata.get(key)
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = [lengths]
        if not isinstance(lengths, list) or not lengths or not all(isinstance(x, int) for x in lengths):
            raise NeedlesError(
                f"{where}: suite task {entry.task} needs its lengths in metadata.{key} (a context-extension "
                "experiment spans lengths up to the target window)",
                fix=f"set metadata.{key}, e.g. [{ctx.native // 2}, {ctx.native * 3 // 4}, "
                f"{(ctx.native + ctx.length) // 2}, {ctx.length - 512}]",
            )
        gen = _room(cfg, family)
        too_long = [x for x in lengths if x + gen > ctx.length]
        if too_long:
            raise NeedlesError(
                f"{where}: metadata.{key} has length(s) {too_long} that do not fit the target window "
                f"context.length={ctx.length} with {gen} tokens for "
                + ("the continuation" if family in PLAIN_FAMILIES else "the chat template and the reply"),
                fix=f"keep metadata.{key} at or below {ctx.length - gen}, or raise finetune.context.length",
            )
        inside[key] = sorted(x for x in lengths if x + gen <= ctx.native)
        past[key] = sorted(x for x in lengths if x + gen > ctx.native)
        if family in PLAIN_FAMILIES:
            if entry.role == "guard":
                raise NeedlesError(
                    f"{where}: {entry.task} cannot be a guard: its documents depend on the longest context of "
                    f"metadata.{key}, so the base model, served inside its window, would score other documents",
                    fix=f"make {entry.task} a target (its loss past the window against the training-free variant), "
                    "and guard inside the window with a generation task (needles_passkey, kv_retrieval_simple)",
                )
            continue
        if inside[key]:
            base_tasks.append(entry.name)
        elif entry.role == "guard":
            raise NeedlesError(
                f"{where}: guard {entry.name} has no length inside the native window {ctx.native} "
                f"(metadata.{key} = {sorted(lengths)}): guards test for no regression where the model already works",
                fix=f"add a length at or below {ctx.native - gen} to metadata.{key}",
            )
    if not any(past.values()):
        raise NeedlesError(
            f"{where}: no suite length is past the native window {ctx.native}, so the extension is never scored",
            fix=f"add lengths between {ctx.native} and {ctx.length - 128} to the metadata length lists",
        )
    return ExtensionPlan(ctx.native, ctx.length, ctx.hf_overrides() or {}, ctx.rope, inside, past, tuple(base_tasks))


def eval_folder(out: Path, variant: str, kind: str) -> Path:
    """Where a variant's lm_eval call of one kind writes: OUT/eval_<variant>, OUT/eval_<variant>_plain."""
    return out / (f"eval_{variant}" if kind == "chat" else f"eval_{variant}_plain")


def variant_argvs(
    cfg: ExperimentConfig, ft, plan: ExtensionPlan, base: str, out: Path
) -> dict[str, dict[str, list[str]]]:
    """variant -> kind -> lm_eval command: ``chat`` scores the suite's tasks with the chat template (and the
    finetune's system prompt), ``plain`` the :data:`PLAIN_FAMILIES` tasks without either; a kind without tasks
    is left out. The same documents at the lengths two variants share."""
    adapter, merged = scored_model(ft, out)
    served = {
        "base": (dataclasses.replace(cfg, metadata=plan.base_metadata(cfg.metadata), max_model_len=plan.native), {}),
        "training_free": (dataclasses.replace(cfg, max_model_len=plan.target), {"hf_overrides": plan.hf_overrides}),
        # an adapter is served on the base model with the RoPE it was trained with; a merged folder carries it
        "finetuned": (
            dataclasses.replace(cfg, max_model_len=plan.target),
            {
                "adapter": adapter,
                "merged": merged,
                "lora_rank": ft.lora_r,
                "hf_overrides": plan.hf_overrides if adapter else None,
            },
        ),  # fmt: skip
    }
    out_argvs: dict[str, dict[str, list[str]]] = {}
    for variant, (vcfg, model) in served.items():
        scored = [e for e in vcfg.suite if variant != "base" or e.name in plan.base_tasks]
        argvs = {}
        for kind in EVAL_KINDS:
            suite = [e for e in scored if is_plain(e.task) == (kind == "plain")]
            if suite:
                kcfg = dataclasses.replace(vcfg, suite=suite)
                folder = eval_folder(out, variant, kind)
                if kind == "chat":
                    argvs[kind] = eval_argv(kcfg, base, folder, system_prompt=ft.system_prompt, **model)
                else:
                    argvs[kind] = eval_argv(kcfg, base, folder, chat_template=False, **model)
        out_argvs[variant] = argvs
    return out_argvs


def pilot_edge(cfg: ExperimentConfig, plan: ExtensionPlan, family: str) -> int:
    """The length at which an extension target is piloted: the longest multiple of 64 that fits the native window
    with the family's room (the reply and the chat template). A skill the model has at half its window and loses
    before its edge has nothing to carry past the window."""
    return (plan.native - _room(cfg, family)) // 64 * 64


def extension_pilot(
    cfg: ExperimentConfig, plan: ExtensionPlan, base: str, out: Path, system_prompt: str | None = None
) -> tuple[list[str], ExperimentConfig, list]:
    """(the base-model command, its config, the checked entries) of a context extension's pilot, served inside the
    native window: a guard or an in-window target at its lengths inside the window, an extension target (lengths
    past the window) at the window's edge (:func:`pilot_edge`). A task checked in both roles scores both lengths in
    one call; each entry reads only its own lengths' documents."""
    from harness_ext.experiment.pilot import entries
    from harness_ext.workflow.pilot import IN_DISTRIBUTION

    # a loss has no floor or ceiling to stop at (and needs its own call without the chat template): not piloted
    suite = [e for e in cfg.suite if not is_plain(e.task)]
    checked_at: dict[str, tuple[int, ...]] = {}
    by_key: dict[str, set[int]] = {}
    past = set()
    for e in suite:
        family = length_family(e.task)
        if family is None:
            continue
        key = LENGTH_FAMILIES[family][0]
        if e.role == "target" and plan.past.get(key):
            past.add(e.name)
            checked_at[e.name] = (pilot_edge(cfg, plan, family),)
        else:
            checked_at[e.name] = tuple(plan.inside[key])
        by_key.setdefault(key, set()).update(checked_at[e.name])
    metadata = {**cfg.metadata, **{key: sorted(lengths) for key, lengths in by_key.items()}}
    pilot_cfg = dataclasses.replace(cfg, suite=suite, metadata=metadata, max_model_len=plan.native)
    argv = eval_argv(pilot_cfg, base, out / "pilot", system_prompt=system_prompt)
    # the in-distribution check is scored at the training lengths, past the window: inside it, a base at ceiling
    # says nothing about what the finetune can show there
    checked = [e for e in entries(pilot_cfg, frozenset(past), checked_at) if e.kind != IN_DISTRIBUTION]
    return argv, pilot_cfg, checked


def extension_mde_text(cfg: ExperimentConfig, plan: ExtensionPlan) -> str:
    """Each target's minimal detectable effect on the documents it is tested on (past the native window, against the
    training-free variant) at Holm's first step over the suite; a loss target's n, its MDE read after the run from
    the observed paired spread."""
    from harness_ext.core import power
    from harness_ext.tasklib.breakdowns import lower_is_better
    from harness_ext.workflow.mde import plan_targets, target_n

    level = cfg.alpha / max(len(cfg.suite), 1)
    scores, losses = [], []
    for e in (e for e in cfg.suite if e.role == "target"):
        family = length_family(e.task)
        key = LENGTH_FAMILIES[family][0] if family else None
        metadata = {**cfg.metadata, key: plan.past[key]} if key and plan.past.get(key) else cfg.metadata
        (losses if lower_is_better(e.metric) else scores).append((e, metadata))
    planned = [plan_targets([(e.name, e.task)], m, level, cfg.limit)[0] for e, m in scores]
    lines = [power.format_plan(planned, "", power.DEFAULT_EFFECT).lstrip()] if planned else []
    for e, m in losses:
        n = target_n(e.task, m, cfg.limit)
        lines.append(
            f"  {e.name}: {e.metric} (lower is better) on {n if n is not None else 'an unknown number of'} paired "
            "documents past the window; paired bootstrap, its MDE read from the observed paired spread after the run"
        )
    return "\n".join(lines)
