"""`needles experiment` on planted per-sample files: a known improvement and a known regression give the
verdicts and exit codes they must, and a finished step is never rerun (the evaluations and the training are
planted as finished steps, so only the comparison and the report run here)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from harness_ext.cli import main
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.run import PLAN, eval_argv
from harness_ext.experiment.verdict import compare_runs
from harness_ext.finetune.modeling import resolve_model
from harness_ext.workflow.training import finetune_config

DATE = "2026-01-01T00-00-00.000000"


def write_run(folder: Path, per_task: dict[str, tuple[str, list[float]]], model: str) -> Path:
    """An lm-eval results file and sample logs: {task: (metric, per-document values)}."""
    folder.mkdir(parents=True, exist_ok=True)
    results, configs = {}, {}
    for task, (metric, values) in per_task.items():
        results[task] = {"alias": task, f"{metric},none": sum(values) / len(values), f"{metric}_stderr,none": 0.05}
        configs[task] = {"task": task, "metadata": {"needles_data_sha256": "ab" * 32}}
        rows = [
            {"doc_id": i, "filter": "none", "doc_hash": f"{task}{i}", "prompt_hash": f"p{i}", "target_hash": f"t{i}",
             metric: v}
            for i, v in enumerate(values)
        ]  # fmt: skip
        (folder / f"samples_{task}_{DATE}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {
        "results": results,
        "configs": configs,
        "versions": dict.fromkeys(per_task, 1.0),
        "n-shot": dict.fromkeys(per_task, 0),
        "higher_is_better": {t: {m: True} for t, (m, _) in per_task.items()},
        "n-samples": {t: {"original": len(v), "effective": len(v)} for t, (_, v) in per_task.items()},
        "config": {"model": "vllm", "model_args": f"pretrained={model}"},
        "date": 1795240155.5,
    }
    path = folder / f"results_{DATE}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def litm(shared_data) -> Path:
    return shared_data / "lost-in-the-middle"


KV = "kv_retrieval_simple"
GUARD = "mdqa_closedbook"
N = 60
BASE_KV = [1.0] * 10 + [0.0] * 50
BETTER_KV = [1.0] * 40 + [0.0] * 20  # 30 documents newly right, none lost
GUARD_VALUES = [1.0] * 20 + [0.0] * 40
DROPPED_GUARD = [0.0] * 60  # the finetuned model lost every answer: a 33-point drop


def config(margin: float = 0.05, mirror: Path | None = None) -> dict:
    """The planted experiment; ``mirror``: the LitM folder the data step finds the guard's oracle file in."""
    return {
        "name": "planted",
        "model": "smollm2",
        "alpha": 0.05,
        "bootstrap_iters": 2000,
        "finetune": {"recipe": "smollm2_kv_lora.yaml"},
        "metadata": {"lengths": [256], "depths": None, "num_samples": N}
        | ({"mdqa_mirror": str(mirror)} if mirror else {}),
        "suite": [
            {"task": KV, "role": "target", "metric": "value_acc"},
            {"task": GUARD, "role": "guard", "metric": "best_subspan_em", "margin": margin},
        ],
    }


def plant(out: Path, guard_after: list[float], smollm2_dir: Path, values: dict) -> None:
    """Finished eval_base / finetune / eval_finetuned steps, as an interrupted experiment leaves them (each
    marker records the command the experiment would run: a marker of another command is refused)."""
    cfg = experiment_from_dict(yaml.safe_load(yaml.safe_dump(values)))  # as the YAML file reads (sorted keys)
    out.mkdir(parents=True)
    ft = finetune_config(cfg, out)
    base_model = resolve_model(cfg.model)
    commands = {
        "eval_base": eval_argv(cfg, base_model, out / "eval_base"),
        "finetune": ["needles", "finetune", "--config", str(out / "finetune.yaml")],
        "eval_finetuned": eval_argv(
            cfg, base_model, out / "eval_finetuned", adapter=out / "finetune" / "adapter", lora_rank=ft.lora_r
        ),
    }
    base = write_run(
        out / "eval_base", {KV: ("value_acc", BASE_KV), GUARD: ("best_subspan_em", GUARD_VALUES)}, str(smollm2_dir)
    )
    new = write_run(
        out / "eval_finetuned",
        {KV: ("value_acc", BETTER_KV), GUARD: ("best_subspan_em", guard_after)},
        str(smollm2_dir),
    )
    steps = out / "steps"
    steps.mkdir()
    markers = {"eval_base": {"results": str(base)}, "finetune": {"manifest": "planted", "final_loss": 0.1},
               "eval_finetuned": {"results": str(new)}}  # fmt: skip
    for name, outputs in markers.items():
        record = {"name": name, "command": shlex.join(commands[name]), "outputs": outputs}
        (steps / f"{name}.json").write_text(json.dumps(record))


def test_improvement_and_held_guard_make_the_claim_hold(tmp_path, smollm2_dir, litm, capsys):
    out = tmp_path / "exp"
    plant(out, GUARD_VALUES, smollm2_dir, config(mirror=litm))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config(mirror=litm)))
    assert main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "CLAIM HOLDS" in printed.out and "done before, skipped" in printed.err
    # progress counts the plan's seven steps, in order (not "1/1" before each); the pilot is not run once the
    # finetune has finished (nothing left to save)
    counters = re.findall(r"\[needles experiment\] (\d)/(\d) (\w+):", printed.err)
    assert counters == [(str(i), "7", name) for i, name in enumerate(PLAN, 1)], counters
    assert json.loads((out / "steps" / "pilot.json").read_text())["outputs"]["skipped"].startswith("the finetune")
    comparison = json.loads((out / "comparison.json").read_text())
    kv, guard = comparison["tasks"]
    assert kv["verdict"] == "improved" and kv["delta"] == pytest.approx(0.5) and kv["p"] < 1e-8
    assert kv["discordant"] == {"only_base_right": 0, "only_finetuned_right": 30}
    assert kv["ci"][0] > 0 and kv["p_holm"] >= kv["p"]
    assert guard["verdict"] == "held (non-inferior)" and guard["delta"] == 0.0 and guard["p_holm"] < 0.05
    # the report: leaderboard rows of both runs, the finetuned one under its adapter name
    rows = (out / "leaderboard.csv").read_text()
    assert "planted-finetuned" in rows and rows.count(KV) >= 2
    # nothing that had finished was run again, and the plan names the command of every step
    plan = json.loads((out / "plan.json").read_text())
    names = ["data", "pilot", "eval_base", "finetune", "eval_finetuned", "compare", "report"]
    assert [s["name"] for s in plan["steps"]] == names and plan["skipped"] == []
    assert json.loads((out / "steps" / "finetune.json").read_text())["outputs"]["manifest"] == "planted"
    assert "lora_local_path=" in plan["steps"][4]["command"] and "lm_eval run" in plan["steps"][2]["command"]
    assert plan["steps"][1]["command"].endswith(
        f"--output_path {out / 'pilot'} --batch_size auto --log_samples --limit 20"
    )
    assert "comparison" in json.loads((out / "steps" / "compare.json").read_text())["outputs"]


def test_a_regressed_guard_makes_the_claim_fail_with_exit_1(tmp_path, smollm2_dir, litm, capsys):
    out = tmp_path / "exp"
    plant(out, DROPPED_GUARD, smollm2_dir, config(mirror=litm))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config(mirror=litm)))
    assert main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(out)]) == 1
    assert "CLAIM NOT SHOWN" in capsys.readouterr().out
    guard = json.loads((out / "comparison.json").read_text())["tasks"][1]
    assert guard["verdict"].startswith("not shown") and guard["delta"] == pytest.approx(-1 / 3)
    assert guard["ci"][1] < -0.05  # the whole interval lies beyond the margin


def test_no_improvement_is_not_a_pass(tmp_path, smollm2_dir):
    base = write_run(tmp_path / "a", {KV: ("value_acc", BASE_KV), GUARD: ("best_subspan_em", GUARD_VALUES)}, "m")
    same = write_run(tmp_path / "b", {KV: ("value_acc", BASE_KV), GUARD: ("best_subspan_em", GUARD_VALUES)}, "m")
    comparison = compare_runs(base, same, experiment_from_dict(config()))
    assert not comparison["claim_holds"] and comparison["tasks"][0]["verdict"] == "no significant improvement"


def test_continuous_metrics_use_the_paired_bootstrap(tmp_path):
    rng = __import__("numpy").random.default_rng(0)
    before = rng.uniform(0, 0.5, 80)
    after = before + 0.2 + rng.normal(0, 0.01, 80)
    cfg = experiment_from_dict(
        {**config(), "suite": [{"task": "niah_single", "role": "target", "metric": "rouge1_recall"}]}
    )
    a = write_run(tmp_path / "a", {"niah_single": ("rouge1_recall", list(before))}, "m")
    b = write_run(tmp_path / "b", {"niah_single": ("rouge1_recall", list(after))}, "m")
    row = compare_runs(a, b, cfg)["tasks"][0]
    assert row["method"].startswith("paired bootstrap") and row["verdict"] == "improved"
    assert row["ci"][0] < row["delta"] < row["ci"][1] and row["delta"] == pytest.approx(0.2, abs=0.01)


def test_different_documents_are_refused(tmp_path):
    a = write_run(tmp_path / "a", {KV: ("value_acc", BASE_KV), GUARD: ("best_subspan_em", GUARD_VALUES)}, "m")
    b = write_run(tmp_path / "b", {KV: ("value_acc", BASE_KV[:-1]), GUARD: ("best_subspan_em", GUARD_VALUES)}, "m")
    with pytest.raises(Exception, match="sample sets differ"):
        compare_runs(a, b, experiment_from_dict(config()))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"suite": []}, "non-empty suite"),
        ({"suite": [{"task": KV, "role": "guard", "metric": "value_acc"}]}, "no target"),
        ({"suite": [{"task": KV, "role": "boss", "metric": "value_acc"}]}, "neither target nor guard"),
        ({"suite": [{"task": KV, "role": "target", "metric": "value_acc", "margin": 0.1}]}, "target with a margin"),
        (
            {
                "suite": [
                    {"task": KV, "role": "guard", "metric": "x", "margin": -1},
                    {"task": GUARD, "role": "target", "metric": "y"},
                ]
            },
            "margin -1",
        ),
        ({"alpha": 0.7}, "alpha 0.7"),
        ({"sweet": 1}, "unknown key"),
        ({"max_model_len": "big"}, "max_model_len"),
    ],
)
def test_bad_configs_are_refused_by_name(change, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config(), **change}))
    assert main(["experiment", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and not (tmp_path / "out").exists()


def test_dry_run_prints_the_cost_and_commands_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config()))
    assert main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "cost estimate: training ~81,920 tokens" in cap.err  # 320 documents x 256 tokens x 1 epoch
    assert "kv_retrieval_simple: 60 documents, ~15,360 prompt tokens" in cap.err
    assert "not estimated" in cap.err and GUARD in cap.err
    assert cap.out.count("lm_eval run") == 2 and "needles finetune --config" in cap.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["smollm2_cpu.yaml", "paper_mistral7b.yaml", "smollm2_synth_mdqa_defaults.yaml"])
def test_shipped_experiments_validate_and_dry_run(name, capsys, tmp_path, monkeypatch):
    """The shipped configs parse, resolve their recipes and print a plan (the 7B one only ever runs on a GPU)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the paper config names its recipe by repo path
    path = Path("examples/experiments") / name
    assert main(["experiment", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "cost estimate" in cap.err and cap.out.count("lm_eval run") == 2
    if name.startswith("paper"):
        assert (
            "training ~2,730,000 tokens, 2 epochs, 350 optimizer steps on one process" in cap.err
        )  # 350 x 3,900 tokens x 2 epochs
        assert "lora_local_path" not in cap.out and "pretrained=" in cap.out.splitlines()[-1]  # full finetune
    else:  # merge: true scores the merged model, not the adapter through vLLM's LoRA kernels
        last = cap.out.splitlines()[-1]
        assert "lora_local_path" not in last and f"pretrained={tmp_path / 'out' / 'finetune' / 'merged'}," in last


def test_without_merge_the_finetuned_suite_scores_the_adapter(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config()))
    assert main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert f"lora_local_path={tmp_path / 'out' / 'finetune' / 'adapter'}" in last and "merged" not in last


def test_cost_estimate_counts_synth_training_documents_per_gold_position(tmp_path):
    from harness_ext.experiment.config import load_experiment
    from harness_ext.workflow.cost import estimate, format_estimate
    from harness_ext.workflow.training import finetune_config

    cfg = config()
    cfg["finetune"] = {"data": {"family": "synth_mdqa", "cell": "symbolic_kv", "num_samples": 10, "positions": [1, 5]}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(tmp_path / "a.yaml")
    est = estimate(exp, finetune_config(exp, tmp_path / "out"))
    assert est["training_tokens"] is None  # passages decide the length: not guessed
    # 10 samples x 2 gold positions, 2 epochs of ceil(20 / 4) batches: the steps the recipe's own plan takes
    assert est["training_rows"] == 20 and est["optimizer_steps"] == 10
    packed = finetune_config(exp, tmp_path / "out")
    packed.batching = "packed"  # rows share batches by their lengths: the steps are not known before generation
    assert estimate(exp, packed)["optimizer_steps"] is None
    assert (
        "training 20 rows (tokens counted once generated), 2 epochs, 10 optimizer steps on one process"
        in format_estimate(est)
    )
    cfg["finetune"]["data"]["lengths"] = [600]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(tmp_path / "b.yaml")
    est = estimate(exp, finetune_config(exp, tmp_path / "out"))
    assert est["epochs"] == 2.0 and est["training_tokens"] == 10 * 2 * 600 * 2  # FinetuneConfig's default 2 epochs


def test_synth_training_is_leak_checked_against_every_loadable_suite_task(tmp_path):
    from harness_ext.experiment.config import load_experiment
    from harness_ext.workflow.training import finetune_config

    cfg = config()
    cfg["suite"].append({"task": "flenqa", "role": "target", "metric": "acc"})  # not loadable by the check
    cfg["finetune"] = {"data": {"family": "synth_mdqa", "cell": "real", "num_samples": 4}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(tmp_path / "s.yaml")
    ft = finetune_config(exp, tmp_path / "out")
    assert ft.eval_tasks == [t for t in exp.tasks if t != "flenqa"] and "mdqa_closedbook" in ft.eval_tasks
    assert ft.eval_metadata == exp.metadata
    kv = finetune_config(load_experiment(_write(tmp_path / "k.yaml", config())), tmp_path / "out2")
    assert kv.eval_tasks == ["kv_retrieval_simple"]  # KV training: the KV documents, as before


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_both_models_are_scored_with_the_system_prompt_the_finetune_trained_with(tmp_path, capsys):
    """A finetune with a system prompt trains on [system, user] turns; lm-eval must render the same turn for the base
    and the finetuned model, or the finetuned model is scored on prompts it never saw (its own default system turn)."""
    cfg = config()
    cfg["finetune"] = {**cfg.get("finetune", {}), "system_prompt": "Answer from the documents only."}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "lm_eval run" in line]
    assert len(commands) == 2
    assert all("--system_instruction 'Answer from the documents only.'" in c for c in commands)
