"""A study variant whose finetune has a ``context`` section (a RoPE change, e.g. a YaRN extension): its adapter is
scored with the RoPE it was trained with, never on the unscaled base.

With ``backend: vllm`` the adapter is served on the base model with the run's ``hf_overrides`` (what ``needles
experiment`` and ``needles finetune``'s printed commands do; a merged or fully finetuned folder carries the RoPE
in its config.json). lm-eval's ``hf`` backend has no such override for a peft adapter, so that combination is
refused before anything runs, with the two ways out.
"""

from __future__ import annotations

from harness_ext.core.errors import NeedlesError


def _plan(ft, base: str, model: str):
    from harness_ext.finetune.context import plan_context

    plan = plan_context(ft.context, base, model)
    return plan if plan is not None and plan.hf_overrides() else None


def check_context(cfg, finetunes: dict, base: str) -> None:
    """Refuse an hf-backend study whose adapter would be scored without the RoPE it was trained with."""
    if cfg.backend != "hf":
        return
    for name, ft in finetunes.items():
        if ft.method == "lora" and not ft.merge and _plan(ft, base, cfg.model) is not None:
            raise NeedlesError(
                f"study config: run {name} trains with finetune.context (a RoPE change), and the hf backend would "
                "score its adapter on the unscaled base model",
                fix="set backend: vllm (the adapter is served with the run's hf_overrides) or finetune.merge: true "
                "(the merged model's config carries the RoPE)",
            )


def run_overrides(study, run: str, adapter: str | None) -> dict | None:
    """The ``hf_overrides`` an adapter of ``run`` is served with (None: no adapter, or no RoPE change)."""
    if not adapter or run not in study.finetune:
        return None
    plan = _plan(study.finetune[run], study.base, study.cfg.model)
    return plan.hf_overrides() if plan is not None else None
