"""`needles study` without training: config errors (exit 2, the key and the fix), --dry-run, --step misuse, a
folder holding another study, and the correlation and report built from step markers (numbers chosen here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from study_configs import kv_study

from harness_ext.cli.app import main
from harness_ext.core.stats import spearman_rho
from harness_ext.study.config import study_from_dict
from harness_ext.study.report import PAPER_FINDINGS, build_report, to_markdown
from harness_ext.study.steps import Study, correlation, make_runs, merged_finetune


def test_the_papers_findings_are_quoted_verbatim_from_the_spec(papers_md):
    text = " ".join(papers_md.read_text(encoding="utf-8").split())
    section = text[text.index("### 4.1") : text.index("### 4.2")]
    for _, finding, source in PAPER_FINDINGS:
        assert finding in section, finding
        assert "[secondary]" in source and "PAPERS.md section 4.1" in source


def _base(model: str = "smollm2") -> dict:
    return kv_study(model)


def _run(capsys, tmp_path: Path, config: object, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["study", str(path), "-o", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


BAD = [
    ("not a mapping", lambda c: [1, 2], "is not a mapping"),
    ("unknown key", lambda c: {**c, "suite": []}, "unknown key(s) ['suite']"),
    ("one variant", lambda c: {**c, "variants": c["variants"][:1]}, "at least two variants"),
    ("same names", lambda c: {**c, "variants": [{"name": "real"}, {"name": "real"}]}, "variant names repeat"),
    ("named base", lambda c: {**c, "variants": [{"name": "real"}, {"name": "base"}]}, "a variant is named 'base'"),
    ("bad name", lambda c: {**c, "variants": [{"name": "real"}, {"name": "a b"}]}, "variants[1] needs a name"),
    ("variant key", lambda c: {**c, "variants": [{"name": "real"}, {"name": "x", "data": {}}]}, "variants[1] has"),
    ("no reference", lambda c: {**c, "reference_variant": "gold"}, "reference_variant 'gold' is not one"),
    ("no targets", lambda c: {**c, "targets": []}, "needs a non-empty targets list"),
    ("target metric", lambda c: {**c, "targets": [{"task": "niah_single"}]}, "targets[0] needs a metric"),
    (
        "discordance",
        lambda c: {**c, "targets": [{**c["targets"][0], "discordance": 1.5}]},
        "targets[0].discordance must be a share of documents in (0, 1] (got 1.5)",
    ),
    ("backend", lambda c: {**c, "backend": "tgi"}, "backend 'tgi' is unknown"),
    ("executor", lambda c: {**c, "executor": "slurm"}, "executor 'slurm' is unknown"),
    ("seeds", lambda c: {**c, "seeds": [0, 0]}, "seeds [0, 0] is not a list of distinct seeds"),
    ("k", lambda c: {**c, "k": 0}, "k 0 is not a whole number >= 1"),
    ("heads option", lambda c: {**c, "heads": {"lenghts": [512]}}, "heads has unknown option(s) ['lenghts']"),
    ("sets", lambda c: {**c, "patching": {"sets": "intersection"}}, "patching.sets 'intersection' is not a list"),
    ("finetune key", lambda c: {**c, "variants": [{"name": "real"}, {"name": "x", "finetune": {"lr": 1}}]}, "lr"),
]


@pytest.mark.parametrize("case,change,problem", BAD, ids=[b[0] for b in BAD])
def test_config_errors_exit_2_with_the_key_and_a_fix(case, change, problem, capsys, tmp_path):
    code, _, err = _run(capsys, tmp_path, change(_base()))
    assert code == 2, err
    assert problem in err and "\n  fix: " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_k_is_checked_against_the_models_heads_before_training(capsys, tmp_path, tiny_llama_dir):
    code, _, err = _run(capsys, tmp_path, {**_base(str(tiny_llama_dir)), "k": 3})
    assert code == 2 and "k 3 is too large" in err and "fix: set k: 2 or lower" in err


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"targets": [{"task": "niah_single", "metric": "niah_success"}]}, "study config: target niah_single:"),
        ({"heads": {"probes": ["mdqa"]}}, "study config: heads probes mdqa:"),
        ({"heads": {"probes": ["niah"], "needles": "/nonexistent/needles.jsonl"}}, "study config: heads.needles:"),
    ],
)
def test_missing_data_is_found_before_anything_slow(change, where, capsys, tmp_path, tiny_llama_dir, monkeypatch):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(empty))  # a mirror without the files: nothing is downloaded
    monkeypatch.setenv("NEEDLES_MDQA_MIRROR", str(empty))
    code, _, err = _run(capsys, tmp_path, {**_base(str(tiny_llama_dir)), **change}, "--dry-run")
    assert code == 2 and where in err and "fix:" in err, err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_every_step_and_writes_nothing(capsys, tmp_path, tiny_llama_dir):
    code, out, _ = _run(capsys, tmp_path, _base(str(tiny_llama_dir)), "--dry-run")
    assert code == 0
    names = [line[2:].split()[0] for line in out.splitlines() if line.startswith("# ")]
    assert names[:4] == ["eval:base", "finetune:real", "eval:real", "heads:real"]
    assert names[-2:] == ["correlation", "report"]
    base_eval = out.split("# eval:base\n")[1].splitlines()[0]  # the base model alone, into OUT/base/eval
    assert f"--model hf --model_args pretrained={tiny_llama_dir},dtype=float32,max_length=4096 " in base_eval
    assert "peft=" not in base_eval and base_eval.endswith(f"--output_path {tmp_path / 'out' / 'base' / 'eval'}")
    assert "needles heads patch --source" in out and "--sets intersection complement random:1" in out
    assert not (tmp_path / "out").exists()
    code, out, _ = _run(capsys, tmp_path, {**_base(str(tiny_llama_dir)), "backend": "vllm"}, "--dry-run")
    adapter = tmp_path / "out" / "runs" / "synth" / "finetune" / "adapter"
    assert code == 0 and f"--model vllm --model_args pretrained={tiny_llama_dir}," in out
    assert f"lora_local_path={adapter},max_lora_rank=16" in out
    # finetune: merge: true scores the merged model (no LoRA in vLLM); the base eval is unchanged
    merged = {**_base(str(tiny_llama_dir)), "backend": "vllm", "finetune": {**_base()["finetune"], "merge": True}}
    code, out, _ = _run(capsys, tmp_path, merged, "--dry-run")
    evals = {
        line[2:].split()[0]: cmd
        for line, cmd in zip(out.splitlines(), out.splitlines()[1:])
        if line.startswith("# eval:")
    }
    assert code == 0 and "lora_local_path" not in out
    assert f"pretrained={tmp_path / 'out' / 'runs' / 'synth' / 'finetune' / 'merged'}," in evals["eval:synth"]
    assert f"pretrained={tiny_llama_dir}," in evals["eval:base"]


def test_dry_run_prints_the_mde_at_a_pilots_discordance(capsys, tmp_path, tiny_llama_dir):
    """The plan says what the targets can detect before anything runs; a pilot's discordance replaces the worst case
    (independent errors at 0.5), which for finetunes of one model overstates the n a study needs."""
    config = _base(str(tiny_llama_dir))
    config["metadata"] = {"num_dicts": 4, "num_samples": 100, "lengths": [512], "depths": [0.5]}  # n 100
    code, _, err = _run(capsys, tmp_path, config, "--dry-run")
    worst = next(line for line in err.splitlines() if line.strip().startswith("kv_retrieval_simple: MDE"))
    assert code == 0 and "at n 100" in worst and "base rate unknown, 0.5 assumed" in worst, err
    config["targets"] = [{**config["targets"][0], "discordance": 0.1}]
    code, _, err = _run(capsys, tmp_path, config, "--dry-run")
    pilot = next(line for line in err.splitlines() if line.strip().startswith("kv_retrieval_simple: MDE"))
    assert code == 0 and "discordance 0.100" in pilot
    mde = [float(line.split("MDE ")[1].split()[0]) for line in (worst, pilot)]
    assert mde[1] < mde[0]  # fewer discordant documents: a smaller change is detectable at the same n
    assert not (tmp_path / "out").exists()


def test_step_misuse_and_a_folder_of_another_study(capsys, tmp_path, tiny_llama_dir):
    config = _base(str(tiny_llama_dir))
    code, _, err = _run(capsys, tmp_path, config, "--step", "heads:nobody")
    assert code == 2 and "no step 'heads:nobody'" in err and "finetune:real" in err
    code, _, err = _run(capsys, tmp_path, config, "--step", "knockout:real")
    assert code == 2 and "step knockout:real needs heads:real first" in err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())  # the plan is written for schedulers
    assert plan["depends_on"]["knockout:real"] == ["heads:real"]
    code, _, err = _run(capsys, tmp_path, {**config, "k": 2}, "--step", "report")
    assert code == 2 and "holds a study of another config" in err


def test_variant_overrides_merge_into_the_shared_finetune_keys():
    cfg = study_from_dict({**_base(), "seeds": [3, 4]})
    runs = make_runs(cfg)
    assert list(runs) == ["real-s3", "synth-s3", "real-s4", "synth-s4"]
    assert runs["synth-s4"].reference == "real-s4"
    merged = merged_finetune(cfg, runs["synth-s4"])
    assert merged["data"] == {"num_samples": 4, "num_dicts": 4, "lengths": None, "seed": 1}
    assert merged["seed"] == 4 and merged["max_steps"] == 1
    assert cfg.finetune["data"] == {"num_samples": 4, "num_dicts": 4, "lengths": None}  # not mutated


def _markers(cfg, recalls: dict[str, float | None], scores: dict[str, float]) -> dict:
    done = {"eval:base": {"results": "base/eval/results_x.json", "scores": {"kv_retrieval_simple": {"value": 0.05}}}}
    for run in scores:
        done[f"eval:{run}"] = {"scores": {"kv_retrieval_simple": {"value": scores[run], "stderr": 0.1, "n": 20}}}
        done[f"heads:{run}"] = {"num_heads": 2, "heads": [[0, 0], [1, 0]], "probes_retrieved": [3, 4]}
        ko = {"accuracy": 0.1, "delta": -0.4, "delta_ci95": [-0.6, -0.2]}
        done[f"knockout:{run}"] = {
            "knockout": f"runs/{run}/knockout/knockout.json",
            "task": "kv_retrieval_simple",
            "metric": "value_acc",
            "num_items": 20,
            "baseline": 0.5,
            "top": ko,
            "random": {**ko, "delta": -0.05, "draws": 5},
            "top_minus_random": {"delta": -0.35, "ci95": [-0.5, -0.2]},
        }
        if run != "real":
            done[f"recall:{run}"] = {"recall": recalls[run], "jaccard": 0.5, "spearman_all_heads": 0.7}
            inter = {"num_heads": 2, "accuracy": 0.6, "delta": 0.2, "delta_ci95": [0.1, 0.3], "gap_closed": 0.5}
            done[f"patch:{run}"] = {
                "sets": {"intersection": inter, "random:1": {**inter, "delta": 0.0, "delta_ci95": [-0.1, 0.1]}},
                "skipped": {"complement": "--sets complement is empty"},
                "intersection_minus_random": [],
            }
    return done


def test_correlation_and_report_from_markers(tmp_path):
    variants = [{"name": n} for n in ("real", "a", "b", "c", "d")]
    cfg = study_from_dict({**_base(), "variants": variants, "bootstrap_iters": 500})
    study = Study(cfg, tmp_path, "/models/tiny", make_runs(cfg), {}, lambda argv: 0, print)
    recalls = {"a": 0.2, "b": 0.5, "c": 0.9, "d": 0.4}
    scores = {"real": 0.8, "a": 0.1, "b": 0.3, "c": 0.35, "d": 0.4}
    done = _markers(cfg, recalls, scores)
    corr = correlation(study, done)
    c = corr["targets"]["kv_retrieval_simple"]
    assert c["spearman"] == pytest.approx(spearman_rho([0.2, 0.5, 0.9, 0.4], [0.1, 0.3, 0.35, 0.4]), abs=1e-6)
    assert c["n"] == 4 and c["ci95"][0] <= c["spearman"] <= c["ci95"][1] and c["note"] is None
    done["correlation"] = corr
    rep = build_report(study, done)
    assert rep["model"] == "tiny" and [r["run"] for r in rep["runs"]] == ["real", "a", "b", "c", "d"]
    assert rep["head_overlap"]["jaccard"][0][0] == 1.0
    gap = next(p for p in rep["paper"] if p["finding"] == "gap")
    assert gap["ours"] == "kv_retrieval_simple: reference 0.800 vs best synthetic 0.400 (d)"
    assert gap["paper"] == "MDQA (Llama-3) real-data F1 0.83 vs best synthetic 0.49" and "[secondary]" in gap["source"]
    assert build_report(study, done) == rep  # deterministic
    md = to_markdown(rep)
    assert "| a | 0.100 ± 0.100 | n/a | 2 | 0.200 | 0.500 | -0.400 [-0.600, -0.200] |" in md
    assert "| base (no finetune) | 0.050 | — | — | — |" in md
    # no sample logs behind these markers: "vs base" says why for every run instead of failing the report
    assert rep["base"]["scores"]["kv_retrieval_simple"]["value"] == 0.05
    assert rep["runs"][1]["vs_base"] == {
        "kv_retrieval_simple": {"error": "base/eval/results_x.json: no such file or folder"}
    }
    assert "- a: kv_retrieval_simple not compared with base: base/eval/results_x.json: no such file" in md
    assert "+0.200 [+0.100, +0.300] | n/a | +0.000 [-0.100, +0.100] |" in md
    assert "a: patch set complement not run" in md


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mirrors(shared_data, tmp_path_factory) -> dict[str, str]:
    """Offline copies of the data the shipped studies name (as their headers build them): the variables to set."""
    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
    from harness_ext.tasklib.mdqa_fixture import build_fixture
    from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture

    root = tmp_path_factory.mktemp("mirrors")
    for rel in RETRIEVAL_HEAD.files:  # the NIAH needles and haystack, laid out as upstream has them
        (root / "niah" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "niah" / rel).symlink_to(
            shared_data / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        )
    oracle = shared_data / "lost-in-the-middle" / "qa_data" / "nq-open-oracle.jsonl.gz"
    build_fixture(oracle, root / "mdqa", settings=(10, 20), num_questions=400, progress=False)
    write_musique_fixture(root / "musique", num_questions=100)
    write_summhay_fixture(root / "summhay")
    return {
        "NEEDLES_MDQA_MIRROR": str(root / "mdqa"),
        "NEEDLES_MUSIQUE_MIRROR": str(root / "musique"),
        "NEEDLES_SUMMHAY_MIRROR": str(root / "summhay"),
        "NEEDLES_NIAH_MIRROR": str(root / "niah"),
        "NEEDLES_ALLOW_UNOFFICIAL_DATA": "1",
    }


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples" / "studies").glob("*.yaml")))
def test_shipped_studies_validate_and_dry_run(name, mirrors, capsys, tmp_path, monkeypatch):
    """Every shipped study parses, resolves its variants and prints its cost and plan without running anything."""
    monkeypatch.chdir(REPO)
    for key, value in mirrors.items():
        monkeypatch.setenv(key, value)
    code = main(["study", f"examples/studies/{name}", "-o", str(tmp_path / "out"), "--dry-run"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    runs = make_runs(study_from_dict(yaml.safe_load((REPO / "examples" / "studies" / name).read_text())))
    assert [f"finetune:{r}" for r in runs] == [
        line.split()[1] for line in cap.out.splitlines() if line.startswith("# finetune:")
    ]
    assert not (tmp_path / "out").exists()
    if name == "smollm2_synth_mdqa_cells_defaults.yaml":  # the defaults its header describes
        for cell in ("templated_entities", "templated_in_prose", "natural_in_prose"):
            line = f"finetune:{cell}: 1,050 rows (tokens counted once generated), 2 epochs, 526 optimizer steps on one process"
            assert line in cap.err
