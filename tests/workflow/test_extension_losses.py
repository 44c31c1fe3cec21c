"""The context-extension experiment with a loss target (needles_long_ppl's nll: a decrease is the improvement) and a
passkey target, from planted lm-eval files: the verdict's direction, the by-length tables, the uninformative rule
left to 0/1 scores, and the separate lm_eval call without the chat template."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from planted import plant_run

from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.extension.report import compare_variants, to_markdown
from harness_ext.workflow.informative import mark_row

PASSKEY, LOSS = "needles_passkey", "needles_long_ppl"


def _cfg(suite: list[dict], **extra) -> object:
    return experiment_from_dict({"name": "ext", "model": "smollm2", "bootstrap_iters": 2000, "suite": suite, **extra})


SUITE = [
    {"task": PASSKEY, "role": "target", "metric": "passkey_acc", "label": "passkey_past"},
    {"task": LOSS, "role": "target", "metric": "nll", "label": "loss_past"},
    {"task": PASSKEY, "role": "guard", "metric": "passkey_acc", "margin": 0.05, "label": "passkey_in"},
]
PLAN = {
    "native": 8192, "target": 12288, "rope": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e5},
    "hf_overrides": {}, "inside": {"passkey_lengths": [1024], "long_ppl_contexts": [4096]},
    "past": {"passkey_lengths": [9216], "long_ppl_contexts": [9216]}, "base_tasks": ["passkey_past", "passkey_in"],
}  # fmt: skip


def _docs(length: int, values: list[float], start: int) -> list[tuple[str, int, float]]:
    return [(str(start + i), length, v) for i, v in enumerate(values)]


def _plant(tmp_path: Path, loss_past_free: list[float], loss_past_tuned: list[float]) -> dict[str, dict[str, str]]:
    """Passkey: 0.9 inside; training-free 0.2 past, finetuned 0.8 past. Loss at 4096 (inside) and 9216 (past)."""
    inside = _docs(1024, [1.0] * 18 + [0.0] * 2, 0)
    key_free, key_tuned = _docs(9216, [1.0] * 4 + [0.0] * 16, 100), _docs(9216, [1.0] * 16 + [0.0] * 4, 100)
    loss_in = _docs(4096, [3.0] * 10, 0)
    folders = {}
    for variant, past, loss_past in (
        ("base", None, None),
        ("training_free", key_free, loss_past_free),
        ("finetuned", key_tuned, loss_past_tuned),
    ):
        chat = plant_run(tmp_path / variant, {PASSKEY: ("passkey_acc", inside + (past or []))})
        folders[variant] = {"chat": str(chat)}
        if loss_past is not None:
            loss = loss_in + _docs(9216, loss_past, 100)
            plain = plant_run(tmp_path / f"{variant}_plain", {LOSS: ("nll", loss)}, length_key="context_tokens")
            folders[variant]["plain"] = str(plain)
    return folders


def test_a_decrease_in_nll_is_the_improvement_and_the_tables_read_by_length(tmp_path):
    rng = np.random.default_rng(0)
    free = list(4.0 + rng.normal(0, 0.05, 12))
    tuned = [v - 0.3 for v in free]  # the finetuned model's loss past the window is lower: improved
    comparison = compare_variants(_plant(tmp_path, free, tuned), _cfg(SUITE), PLAN, [])
    passkey, loss, guard = comparison["tasks"]
    assert loss["verdict"] == "improved over training-free" and loss["pass"]
    assert loss["delta"] == pytest.approx(-0.3) and loss["ci"][1] < 0 and loss["lower_is_better"]
    assert loss["reference"] == "training_free" and loss["n"] == 12 and "finetuned lower" in loss["method"]
    assert passkey["verdict"] == "improved over training-free" and passkey["n"] == 20
    assert guard["verdict"] == "held (non-inferior)" and comparison["claim_holds"]
    tables = {t["task"]: t for t in comparison["by_length"]}
    rows = {r["length"]: r for r in tables["loss_past"]["rows"]}
    assert sorted(rows) == [4096, 9216] and rows[9216]["past_native_window"] and not rows[4096]["past_native_window"]
    assert "base" not in rows[4096]  # the base model does not score the loss (other documents inside its window)
    assert rows[9216]["finetuned"]["mean"] == pytest.approx(rows[9216]["training_free"]["mean"] - 0.3)
    keys = {r["length"]: r for r in tables["passkey_past"]["rows"]}
    assert keys[1024]["base"]["mean"] == 0.9 and keys[9216]["training_free"]["mean"] == 0.2
    assert keys[9216]["finetuned"]["mean"] == 0.8 and "base" not in keys[9216]
    md = to_markdown(comparison)
    assert "### loss_past (nll, lower is better; length = context tokens)" in md
    assert "| 9216 (past the window) | — | 4.0" in md and "(no chat template)" in md
    # a loss gets no effective length (RULER's score cutoff means nothing for it)
    assert [e["task"] for e in comparison["effective_length"]] == ["passkey_past", "passkey_in"]


def test_a_rise_in_nll_is_not_an_improvement(tmp_path):
    free = [4.0 + 0.01 * i for i in range(12)]
    comparison = compare_variants(_plant(tmp_path, free, [v + 0.3 for v in free]), _cfg(SUITE), PLAN, [])
    loss = comparison["tasks"][1]
    assert loss["verdict"] == "no significant improvement" and loss["p"] > 0.5 and loss["delta"] == pytest.approx(0.3)
    assert not comparison["claim_holds"]


def test_a_loss_guard_bounds_a_rise():
    from harness_ext.workflow.paired import compare_entry
    from harness_ext.workflow.suite import SuiteTask

    cfg = _cfg(SUITE)
    base = 3.0 + np.random.default_rng(1).normal(0, 0.02, 30)
    guard = SuiteTask(LOSS, "guard", "nll_len4096", margin=0.05)
    assert compare_entry(guard, base, base - 0.01, cfg)["p"] < 0.01  # lower loss: held
    assert compare_entry(guard, base, base + 0.2, cfg)["p"] > 0.5  # a rise past the margin: not held


def test_floor_and_ceiling_are_for_scores_only():
    row = {"metric": "nll", "verdict": "improved over training-free", "pass": True}
    assert not mark_row(row, [1.0] * 5, [1.0] * 5) and row["pass"]  # a loss of exactly 1 nat is no ceiling
    score = {"metric": "passkey_acc", "verdict": "held (non-inferior)", "pass": True}
    assert mark_row(score, [1.0] * 5, [1.0] * 5) and score["verdict"] == "uninformative (both at ceiling)"


def _plain_argvs(tmp_path, system_prompt: str | None) -> dict:
    from harness_ext.experiment.extension.plan import plan_extension, variant_argvs
    from harness_ext.workflow.training import finetune_config

    cfg = _cfg(
        SUITE,
        finetune={"context": {"length": 12288, "rope": {"type": "yarn"}}, "merge": True,
                  **({"system_prompt": system_prompt} if system_prompt else {})},
        metadata={"passkey_lengths": [1024, 9216], "long_ppl_contexts": [4096, 9216], "long_ppl_num_docs": 4},
    )  # fmt: skip
    ft = finetune_config(cfg, tmp_path / "out")
    plan = plan_extension(cfg, ft)
    return variant_argvs(cfg, ft, plan, "/models/smollm2", tmp_path / "out"), plan


def test_the_loss_runs_in_its_own_call_without_the_chat_template(tmp_path):
    argvs, plan = _plain_argvs(tmp_path, "Answer briefly.")
    assert sorted(argvs["base"]) == ["chat"]  # the base model does not score the loss
    assert plan.past["long_ppl_contexts"] == [9216] and plan.inside["long_ppl_contexts"] == [4096]
    for variant in ("training_free", "finetuned"):
        chat, plain = argvs[variant]["chat"], argvs[variant]["plain"]
        assert chat[chat.index("--tasks") + 1] == PASSKEY and "--apply_chat_template" in chat
        assert chat[chat.index("--system_instruction") + 1] == "Answer briefly."
        assert plain[plain.index("--tasks") + 1] == LOSS
        assert "--apply_chat_template" not in plain and "--system_instruction" not in plain
        assert plain[plain.index("--output_path") + 1] == str(tmp_path / "out" / f"eval_{variant}_plain")
        assert "--log_samples" in plain
    free = argvs["training_free"]
    assert [a for a in free["plain"] if a.startswith("hf_overrides=")] == [
        a for a in free["chat"] if a.startswith("hf_overrides=")
    ]  # the same RoPE for both calls of a variant
    from harness_ext.experiment.extension.run import step_command

    both = step_command(free)
    assert both[:2] == ["sh", "-c"] and both[2] == shlex.join(free["chat"]) + " && " + shlex.join(free["plain"])


def test_a_loss_guard_is_refused(tmp_path):
    from harness_ext.experiment.extension.plan import plan_extension
    from harness_ext.workflow.training import finetune_config

    suite = [SUITE[0], {"task": LOSS, "role": "guard", "metric": "nll", "margin": 0.05}]
    cfg = _cfg(
        suite,
        finetune={"context": {"length": 12288, "rope": {"type": "yarn"}}},
        metadata={"passkey_lengths": [1024, 9216], "long_ppl_contexts": [4096, 9216]},
    )
    with pytest.raises(NeedlesError, match="cannot be a guard") as err:
        plan_extension(cfg, finetune_config(cfg, tmp_path / "out"))
    assert "make needles_long_ppl a target" in err.value.fix
