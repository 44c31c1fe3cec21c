"""A study without head steps (`heads: false`) and the shipped MDQA diagnosis: the plan holds finetunes, evals and
the report only; the report pairs every run with base and with the reference run and shows the form of the replies
(planted MDQA-like sample logs); the diagnosis config changes one setting of the reference's finetune per variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from study_configs import kv_study

from harness_ext.cli.app import main
from harness_ext.study.config import load_study, plain, study_from_dict
from harness_ext.study.report import build_report, plots, to_markdown
from harness_ext.study.steps import Study, make_runs, merged_finetune
from harness_ext.study.vs_base import cell
from harness_ext.tasklib.metrics import best_subspan_em

REPO = Path(__file__).resolve().parents[2]
TASK, DATE = "mdqa_sweep", "2026-01-01T00-00-00"


def _run(capsys, tmp_path: Path, config: dict, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["study", str(path), "-o", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_heads_false_plans_finetunes_evals_and_the_report_only(capsys, tmp_path, tiny_llama_dir):
    config = kv_study(str(tiny_llama_dir), heads=False)
    code, out, err = _run(capsys, tmp_path, config, "--dry-run")
    assert code == 0, err
    names = [line[2:].split()[0] for line in out.splitlines() if line.startswith("# ")]
    assert names == ["eval:base", "finetune:real", "eval:real", "finetune:synth", "eval:synth", "report"]
    assert "needles heads" not in out and "heads, knockout, patching: none (heads: false)" in err
    # what study.yaml records reads back as the same study (a `--step` command reloads it)
    cfg = study_from_dict(config)
    assert cfg.heads is False and not cfg.head_steps and study_from_dict(plain(cfg)) == cfg
    code, _, err = _run(capsys, tmp_path, {**config, "knockout": {"eval_lengths": [512]}}, "--dry-run")
    assert code == 2 and "heads: false runs no head steps, but knockout options are given" in err
    assert "fix: drop `knockout:`" in err


def _plant(out: Path, rel: str, replies: list[str], answers: list[list[str]]) -> str:
    """An MDQA-like results file and sample log as `lm_eval --log_samples` writes them; returns the results path."""
    folder = out / rel
    folder.mkdir(parents=True)
    values = [best_subspan_em(r, a) for r, a in zip(replies, answers, strict=True)]
    results = {
        "results": {TASK: {"alias": TASK, "best_subspan_em,none": float(np.mean(values)),
                           "best_subspan_em_stderr,none": 0.05}},
        "configs": {TASK: {}},
        "versions": {TASK: 1.0},
        "n-samples": {TASK: {"original": len(values), "effective": len(values)}},
    }  # fmt: skip
    (folder / f"results_{DATE}.json").write_text(json.dumps(results))
    rows = [
        {"doc_id": i, "doc": {"answers": a}, "target": a, "resps": [[r]], "filtered_resps": [r], "filter": "none",
         "doc_hash": f"d{i}", "prompt_hash": f"p{i}", "target_hash": f"t{i}", "best_subspan_em": v}
        for i, (r, a, v) in enumerate(zip(replies, answers, values, strict=True))
    ]  # fmt: skip
    (folder / f"samples_{TASK}_{DATE}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{rel}/results_{DATE}.json"


def test_a_report_without_heads_pairs_runs_with_base_and_the_reference_and_shows_reply_form(tmp_path):
    cfg = study_from_dict(
        {"name": "s", "model": "smollm2", "reference_variant": "recipe", "heads": False, "bootstrap_iters": 200,
         "variants": [{"name": "recipe"}, {"name": "lr_low"}], "targets": [{"task": TASK, "metric": "best_subspan_em"}]}
    )  # fmt: skip
    study = Study(cfg, tmp_path, "/models/tiny", make_runs(cfg), {}, lambda argv: 0, print)
    answers = [["Paris"]] * 40
    base = ["Paris"] * 20 + ["Rome"] * 20  # 0.50
    recipe = ["Paris"] * 8 + ["\nParis"] * 12 + ["Rome"] * 20  # 0.20: 12 answers past the first line
    lr_low = ["Paris"] * 18 + ["Rome"] * 22  # 0.45: 10 more right than the reference, 2 fewer than base
    done = {}
    for name, replies in (("base", base), ("recipe", recipe), ("lr_low", lr_low)):
        rel = _plant(tmp_path, "base/eval/m" if name == "base" else f"runs/{name}/eval/m", replies, answers)
        value = float(np.mean([best_subspan_em(r, a) for r, a in zip(replies, answers, strict=True)]))
        done[f"eval:{name}"] = {"results": rel, "scores": {TASK: {"value": value, "stderr": 0.05, "n": 40}}}
    rep = build_report(study, done)
    assert "head_overlap" not in rep and "correlation" not in rep and "paper" not in rep and plots(rep) == {}
    low = rep["runs"][1]
    assert set(low) == {"run", "variant", "seed", "reference", "finetune", "scores", "vs_base", "vs_reference"}
    assert low["vs_base"][TASK]["delta"] == pytest.approx(-0.05)
    # against the reference run, not against base: 10 discordant pairs, all for lr_low
    assert low["vs_reference"][TASK]["delta"] == pytest.approx(0.25)
    assert low["vs_reference"][TASK]["discordant"] == {"only_base_right": 0, "only_run_right": 10}
    assert rep["runs"][0]["vs_reference"] is None
    form = rep["reply_form"]
    assert list(form) == ["base", "recipe", "lr_low"]
    assert form["recipe"][TASK] | {"mean_words": 0, "mean_chars": 0} == {
        "n": 40, "mean_words": 0, "mean_chars": 0, "contains_answer": 0.5, "credited": 0.2,
        "answer_not_credited": 0.3, "empty": 0.0,
    }  # fmt: skip
    md = to_markdown(rep)
    assert "| run | mdqa_sweep | vs base |\n|---|---|---|\n| base (no finetune) | 0.500 ± 0.050 | — |" in md
    assert "## vs the reference run (recipe)" in md and f"| lr_low | {cell(low['vs_reference'][TASK])} |" in md
    assert "| recipe | mdqa_sweep | 40 | 1.0 | 4.8 | 0.500 | 0.200 | 0.300 | 0.000 |" in md
    assert "knockout" not in md.lower() and "Beside the paper" not in md
    assert json.dumps(rep).count(str(tmp_path)) == 0


def test_the_diagnosis_changes_one_setting_of_the_reference_per_variant():
    cfg = load_study(REPO / "examples" / "studies" / "smollm2_mdqa_diagnosis.yaml")
    assert cfg.heads is False and cfg.in_distribution["enabled"] and cfg.reference_variant == "recipe"
    assert [t.task for t in cfg.targets] == [TASK] and cfg.metadata["mdqa_split"] == "eval"
    assert cfg.metadata["mdqa_num_questions"] * len(cfg.metadata["mdqa_positions"]) == 384
    runs = make_runs(cfg)
    ref = merged_finetune(cfg, runs["recipe"])
    assert ref["data"] == {"family": "synth_mdqa", "cell": "real", "num_samples": 16, "num_documents": 5,
                           "positions": [1, 3, 5]}  # fmt: skip

    def changed(name: str) -> dict:
        ft = merged_finetune(cfg, runs[name])
        out = {k: ft[k] for k in ft if k != "data" and ft[k] != ref.get(k)}
        return out | {f"data.{k}": v for k, v in ft["data"].items() if v != ref["data"].get(k)}

    assert changed("docs10") == {"data.num_documents": 10, "data.positions": [1, 5, 10]}
    assert changed("lr_quarter") == {"learning_rate": ref["learning_rate"] / 4}
    assert changed("steps48") == {"data.num_samples": 4 * ref["data"]["num_samples"]}  # 4 x the optimizer steps
    assert changed("paper") == {"method": "full", "learning_rate": 5.0e-6, "epochs": 2.0, "grad_accum": 4}
    assert changed("sentence") == {"data.target": "sentence"}  # the reply form the training target asks for
