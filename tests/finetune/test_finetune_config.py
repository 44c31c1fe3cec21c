"""The finetune configuration and its command line: generated flags, the packaged recipe, and bad input.

Fast: nothing here trains. Bad values must end with ``needles: error`` + a fix (exit 2) before any
model is loaded; an output folder in use or holding a finished run is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import finetune_argv

from harness_ext.cli import finetune as finetune_cmd
from harness_ext.cli import main as cli_main
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.args import finetune_parser, overrides_from_args
from harness_ext.finetune.config import FinetuneConfig, load_config, packaged_config, read_yaml, validate_hparams
from harness_ext.finetune.modeling import resolve_model
from harness_ext.finetune.openai_ft import validate_rows
from harness_ext.finetune.rundir import OutputLock, check_output_dir

REPO = Path(__file__).resolve().parents[2]

# The flags as they were kept by hand before they were generated: names and order must not change.
FINETUNE_FLAGS = [
    *("--config", "--model", "-o", "--output-dir", "--method", "--variant", "--answer-template"),
    *("--no-answer-template", "--num-samples", "--data-seed", "--lengths", "--num-dicts", "--depths"),
    *(
        "--data-family",
        "--data-cell",
        "--num-documents",
        "--positions",
        "--facts-per-document",
        "--reference-needles",
        "--no-reference-needles",
        "--data-target",
    ),
    *("--system-prompt", "--eval-tasks", "--eval-metadata", "--lora-r", "--lora-alpha", "--lora-dropout"),
    *("--target-modules", "--epochs", "--max-steps", "--lr", "--batch-size", "--grad-accum", "--warmup-ratio"),
    *("--lr-scheduler", "--weight-decay", "--max-grad-norm", "--gradient-checkpointing"),
    *("--no-gradient-checkpointing", "--batching", "--pack-tokens", "--max-length", "--seed", "--loss-on"),
    *("--attn-implementation", "--trust-remote-code", "--save-every", "--keep-checkpoints", "--resume"),
    *("--stop-after-steps", "--merge", "--report-to"),
    # context extension: the context section's keys, the section as JSON, the checkpointing threshold
    *("--context-length", "--rope-type", "--rope-factor", "--rope-theta", "--rope-original-max-position-embeddings"),
    *("--rope-attention-factor", "--rope-beta-fast", "--rope-beta-slow", "--rope-low-freq-factor"),
    *("--rope-high-freq-factor", "--context", "--gradient-checkpointing-above"),
    *("--backend", "--openai-model", "--n-epochs", "--suffix"),
    *("--poll-interval", "--timeout"),
]
EXPORT_FLAGS = [
    *("--config", "--model", "--variant", "--answer-template", "--no-answer-template", "--num-samples"),
    *("--data-seed", "--lengths", "--num-dicts", "--depths"),
    *(
        "--data-family",
        "--data-cell",
        "--num-documents",
        "--positions",
        "--facts-per-document",
        "--reference-needles",
        "--no-reference-needles",
        "--data-target",
    ),
    *("--system-prompt", "--eval-tasks"),
    *("--eval-metadata", "--openai-model", "--max-tokens", "-o", "--output"),
]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="needles")
    sub = parser.add_subparsers(dest="command", required=True)
    finetune_cmd.register(sub)
    return sub.choices


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


def needles(argv: list[str], capsys) -> tuple[int, str, str]:
    """`needles <argv>` through the real CLI (parser, error printer, exit code)."""
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------- generated flags
def test_generated_flags_are_the_hand_kept_ones():
    parsers = subparsers()
    assert option_strings(parsers["finetune"]) == FINETUNE_FLAGS
    assert option_strings(parsers["loop"])[: len(FINETUNE_FLAGS)] == FINETUNE_FLAGS
    assert option_strings(parsers["export-openai"]) == EXPORT_FLAGS
    # `python -m harness_ext.finetune` parses with the same generated parser
    assert option_strings(finetune_parser()) == FINETUNE_FLAGS
    # config flags default to None, so that a YAML file is overridden only by what is given
    args = parsers["finetune"].parse_args([])
    assert overrides_from_args(args) == {}
    assert args.backend == "hf" and args.openai_model == "gpt-3.5-turbo-1106" and args.timeout == 24 * 3600.0
    assert parsers["loop"].parse_args([]).output_dir == "outputs/loop"


def test_every_config_field_but_the_internal_ones_has_a_flag():
    dests = {a.dest for a in finetune_parser()._actions}
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    renamed = {"learning_rate": "lr"}
    missing = {f for f in fields if renamed.get(f, f) not in dests} - {"data", "log_every"}
    assert not missing


def test_flags_map_onto_config_keys():
    args = finetune_parser().parse_args(
        [
            *("--lr", "1e-3", "--data-seed", "7", "--num-samples", "20", "--no-answer-template"),
            *("--target-modules", "q_proj", "v_proj", "--gradient-checkpointing", "--merge", "-o", "out"),
            *("--eval-metadata", '{"lengths": [128]}', "--lora-alpha", "8", "--depths", "0", "0.5"),
        ]
    )
    assert overrides_from_args(args) == {
        "learning_rate": 1e-3,
        "data": {"seed": 7, "num_samples": 20, "answer_template": False, "depths": [0.0, 0.5]},
        "target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": True,
        "merge": True,
        "output_dir": "out",
        "eval_metadata": {"lengths": [128]},
        "lora_alpha": 8.0,
    }
    # a dictionary count replaces the token targets of a YAML file
    cfg = load_config(None, overrides_from_args(finetune_parser().parse_args(["--num-dicts", "5"])))
    assert cfg.data["num_dicts"] == 5 and cfg.data["lengths"] is None


def test_module_entry_point_has_the_same_flags_and_errors():
    run = [sys.executable, "-m", "harness_ext.finetune"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 0 and "--eval-metadata" in shown.stdout and "--poll-interval" in shown.stdout
    bad = subprocess.run([*run, "--epochs", "0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "needles: error: epochs=0.0 must be positive" in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------- the packaged recipe
def test_packaged_loop_recipe_is_the_documented_example():
    from harness_ext.experiment.loop import DEFAULT_EVAL_METADATA, DEFAULT_TRAINING

    packaged = packaged_config("smollm2_kv_lora.yaml")
    assert packaged.is_relative_to(REPO / "harness_ext")  # inside the package: shipped in the wheel
    assert read_yaml(REPO / "examples" / "finetune" / "smollm2_kv_lora.yaml") == read_yaml(packaged)
    # the loop's defaults are that file's (the values the CPU demo was measured with)
    assert DEFAULT_EVAL_METADATA == {"lengths": [256], "depths": None, "num_samples": 100}
    assert DEFAULT_TRAINING == {
        "data": {"variant": "simple", "answer_template": False, "num_samples": 320, "seed": 0, "lengths": [256]},
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 5e-4,
        "epochs": 1.0,
        "batch_size": 4,
        "warmup_ratio": 0.05,
    }
    validate_hparams(load_config(packaged))
    with pytest.raises(NeedlesError, match="no packaged finetune config"):
        packaged_config("nope.yaml")


# ------------------------------------------------------------------------------------- bad input
def test_a_missing_model_folder_is_named_and_a_hub_id_stays_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    for missing in ("/nonexistent", str(tmp_path / "no" / "model"), "./models/gone", "~/gone-model"):
        code, _, err = needles(["finetune", "--model", missing, "-o", str(out)], capsys)
        assert code == 2 and f"no such model folder: {missing}" in err and "fix:" in err, err
        assert "Repo id" not in err
    assert not out.exists()  # refused before the output folder was claimed
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    code, _, err = needles(["finetune", "--model", str(weights), "-o", str(out)], capsys)
    assert code == 2 and "is a file, not a model folder" in err
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"
    with pytest.raises(NeedlesError, match="holds no config.json"):
        resolve_model(str(tmp_path))  # a folder, but no model in it
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "epochs=0.0 must be positive"),
        (["--epochs", "-1"], "epochs=-1.0 must be positive"),
        (["--lr=-2e-4"], "learning_rate=-0.0002 must be positive"),
        (["--lr", "0"], "learning_rate=0.0 must be positive"),
        (["--batch-size", "0"], "batch_size=0 must be at least 1"),
        (["--grad-accum", "-1"], "grad_accum=-1 must be at least 1"),
        (["--max-steps", "0"], "max_steps=0 must be at least 1"),
        (["--num-samples", "0"], "data.num_samples=0 must be at least 1"),
        (["--num-samples", "-5"], "data.num_samples=-5 must be at least 1"),
        (["--num-dicts", "0"], "data.num_dicts=0 must be at least 1"),
        (["--data-seed", "-1"], "data.seed=-1 must be at least 0"),
        (["--warmup-ratio", "1.5"], "warmup_ratio=1.5 is not in [0, 1)"),
        (["--lora-dropout", "-0.1"], "lora_dropout=-0.1 is not in [0, 1)"),
        (["--lora-alpha", "0"], "lora_alpha=0.0 must be positive"),
        (["--weight-decay", "-1"], "weight_decay=-1.0 must be at least 0"),
        (["--max-grad-norm", "-1"], "max_grad_norm=-1.0 must be at least 0"),
        (["--save-every", "-1"], "save_every=-1 must be at least 0"),
        (["--keep-checkpoints", "0"], "keep_checkpoints=0 must be at least 1"),
        (["--pack-tokens", "0"], "pack_tokens=0 must be at least 1"),
        (["--max-length", "-8"], "max_length=-8 must be at least 1"),
        (["--stop-after-steps", "0"], "stop_after_steps=0 must be at least 1"),
        (["--seed", "-3"], "seed=-3 must be at least 0"),
        (["--backend", "openai", "--n-epochs", "0"], "n_epochs=0 must be at least 1"),
        (["--backend", "openai", "--poll-interval", "0"], "poll_interval=0.0 must be positive"),
        (["--backend", "openai", "--timeout", "-5"], "timeout=-5.0 must be positive"),
    ],
)
def test_zero_or_negative_numbers_are_refused_before_any_model(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = needles(["finetune", "--model", str(tmp_path / "never-loaded"), "-o", str(out), *flags], capsys)
    assert code == 2 and f"needles: error: {message}" in err and "  fix: " in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-samples", "0"], "data.num_samples=0 must be at least 1"),
        (["--max-tokens", "0"], "max_tokens=0 must be at least 1"),
        (["--num-dicts", "-2"], "data.num_dicts=-2 must be at least 1"),
    ],
)
def test_export_openai_refuses_zero_or_negative_numbers(flags, message, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    code, _, err = needles(["export-openai", "--model", "/nonexistent", "-o", str(path), *flags], capsys)
    assert code == 2 and message in err and "fix:" in err, err
    assert not path.exists()


def test_lora_options_are_checked_only_for_lora():
    validate_hparams(FinetuneConfig(method="full", lora_r=0, lora_dropout=2.0))
    with pytest.raises(NeedlesError, match=r"LoRA rank r=0 must be positive"):
        validate_hparams(FinetuneConfig(method="lora", lora_r=0))


def test_a_number_written_as_text_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2e-4\n")  # YAML 1.1 reads this as a string
    with pytest.raises(NeedlesError, match=r"learning_rate='2e-4' is not a number") as info:
        validate_hparams(load_config(path))
    assert "2.0e-4" in info.value.fix


def test_too_few_openai_examples_says_how_many_and_how_many_are_needed():
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    with pytest.raises(NeedlesError) as info:
        validate_rows([good] * 3)
    assert "fewer than 10 examples: got 3 (OpenAI needs at least 10)" in info.value.problem
    assert "first" not in info.value.problem and "--num-samples" in info.value.fix


# ------------------------------------------------------------------------------------- the output folder
def test_a_finished_run_or_another_runs_checkpoints_are_not_overwritten(tiny_llama_dir, tmp_path, capsys):
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    code, _, err = needles(finetune_argv(tiny_llama_dir, done), capsys)
    assert code == 2 and "already holds a finished run (manifest.json)" in err and "--output-dir" in err
    assert (done / "manifest.json").read_text() == "{}"
    ckpt = tmp_path / "ckpt" / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "needles_state.json").write_text("{}")
    code, _, err = needles(finetune_argv(tiny_llama_dir, tmp_path / "ckpt"), capsys)
    assert code == 2 and "already holds checkpoints of a run" in err and "--resume" in err
    check_output_dir(done, resume=True)  # --resume is the way to continue in a used folder
    check_output_dir(tmp_path / "fresh", resume=False)


def test_an_output_folder_in_use_by_another_run_is_refused(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from harness_ext.finetune.rundir import OutputLock; "
            "held = OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = needles(finetune_argv(tiny_llama_dir, out), capsys)
        assert code == 2 and f"{out} is in use by another finetune run" in err and "fix:" in err
        with pytest.raises(NeedlesError, match="in use"):
            OutputLock(out, rank=0).acquire()
        # another rank of the same accelerate launch is not blocked by rank 0
        OutputLock(out, rank=1).acquire().release()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: nothing stale is left behind
    OutputLock(out).acquire().release()
