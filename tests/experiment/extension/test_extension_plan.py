"""The context-extension experiment without running a model: how the suite's lengths split at the native window,
the three variants' commands (--dry-run), the cost estimate printed first, and every bad config refused with
exit 2 naming the key and the fix. Only the model's config.json is read (the heavy end-to-end run is
tests/experiment/extension/test_extension_experiment.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from harness_ext.cli import main

NATIVE = 512


@pytest.fixture
def model(tmp_path) -> Path:
    """A model folder holding only a Llama config.json with a 512-token window (nothing else is read)."""
    folder = tmp_path / "model"
    folder.mkdir()
    conf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": NATIVE,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(conf))
    return folder


def config(model: Path, **changes) -> dict:
    base = {
        "name": "ext",
        "model": str(model),
        "finetune": {
            "context": {"length": 1024, "rope": {"type": "yarn"}},
            "data": {"lengths": [700], "num_samples": 4},
            "max_steps": 2,
            "merge": True,
        },
        "metadata": {"lengths": [300, 800], "depths": [0.5], "num_samples": 3},
        "suite": [
            {"task": "kv_retrieval_simple", "role": "target", "metric": "value_acc"},
            {"task": "kv_retrieval_simple", "role": "guard", "metric": "value_acc", "margin": 0.1, "label": "kv_in"},
        ],
    }
    return {**base, **changes}


def dry_run(tmp_path: Path, cfg: dict, capsys) -> tuple[int, str, str]:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["experiment", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "out"), "--dry-run"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def model_args(line: str) -> dict:
    argv = shlex.split(line)
    args = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
    extra = [a for a in argv if a.startswith("hf_overrides=")]
    if extra:
        args["hf_overrides"] = json.loads(extra[0].split("=", 1)[1])
    args["metadata"] = json.loads(argv[argv.index("--metadata") + 1])
    return args


def test_three_variants_split_at_the_native_window(tmp_path, model, capsys):
    code, out, err = dry_run(tmp_path, config(model), capsys)
    assert code == 0, err
    # the estimate comes first and counts the base's short documents apart from the two extended runs'
    assert "cost estimate: context extension 512 -> 1024 tokens (yarn, factor 2)" in err
    assert "base, inside the native window: 3 documents, ~900 prompt tokens" in err
    assert "training-free and finetuned, each: 6 documents, ~3,300 prompt tokens" in err
    commands = [line for line in out.splitlines() if line.startswith("lm_eval run")]
    assert len(commands) == 3 and "needles finetune --config" in out
    base, free, tuned = (model_args(c) for c in commands)
    # base: its own window, only the length that fits there (300 + reply + chat template <= 512)
    assert base["max_model_len"] == "512" and base["metadata"]["lengths"] == [300] and "hf_overrides" not in base
    # training-free: the untrained model with the extension's RoPE, every length
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": NATIVE}
    assert free["pretrained"] == str(model) and free["max_model_len"] == "1024"
    assert free["hf_overrides"] == {"rope_parameters": rope, "max_position_embeddings": 1024}
    assert free["metadata"]["lengths"] == [300, 800]
    # finetuned: the merged folder, whose config carries the RoPE (no override needed)
    assert tuned["pretrained"].endswith("finetune/merged") and "hf_overrides" not in tuned
    assert tuned["max_model_len"] == "1024" and tuned["metadata"] == free["metadata"]
    assert not (tmp_path / "out").exists()


def test_an_adapter_is_served_with_the_override(tmp_path, model, capsys):
    cfg = config(model)
    cfg["finetune"]["merge"] = False
    code, out, err = dry_run(tmp_path, cfg, capsys)
    tuned = model_args([line for line in out.splitlines() if line.startswith("lm_eval run")][-1])
    assert code == 0 and tuned["pretrained"] == str(model) and "lora_local_path" in tuned
    assert tuned["hf_overrides"]["max_position_embeddings"] == 1024


def test_without_a_context_section_the_plain_experiment_is_planned(tmp_path, model, capsys):
    cfg = config(model)
    del cfg["finetune"]["context"]
    cfg["finetune"]["data"] = {"lengths": [300], "num_samples": 4}
    cfg["metadata"]["lengths"] = [300]
    code, out, err = dry_run(tmp_path, cfg, capsys)
    assert code == 0 and out.count("lm_eval run") == 2 and "context extension" not in err + out


@pytest.mark.parametrize(
    "change, message, fix",
    [
        (
            {"metadata": {"depths": [0.5], "num_samples": 3}},
            "needs its lengths in metadata.lengths",
            "set metadata.lengths",
        ),
        ({"metadata": {"lengths": [300, 990]}}, "length(s) [990] that do not fit the target window", "at or below 896"),
        ({"metadata": {"lengths": [200, 300]}}, "no suite length is past the native window 512", "add lengths between"),
        ({"metadata": {"lengths": [800]}}, "guard kv_in has no length inside the native window 512", "at or below 384"),
        (
            {"gen_kwargs": "max_gen_toks=200", "metadata": {"lengths": [300, 700]}},
            "guard kv_in has no length",
            "at or below 248",
        ),
    ],
)
def test_bad_extension_suites_exit_2_naming_the_key(tmp_path, model, capsys, change, message, fix):
    code, out, err = dry_run(tmp_path, config(model, **change), capsys)
    assert code == 2 and message in err and "fix:" in err and fix in err.split("fix:", 1)[1], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_shipped_llama3_extension_prints_its_cost_first(tmp_path, capsys, monkeypatch):
    """examples/experiments/llama3_8b_extend.yaml: the estimate and the commands from the model's config.json alone,
    found in the Hugging Face cache (here a cache holding only Llama-3-8B-Instruct's published config.json)."""
    import huggingface_hub.constants

    repo = "meta-llama/Meta-Llama-3-8B-Instruct"
    cache = tmp_path / "hub"
    snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "rope_scaling": None, "num_hidden_layers": 32}  # fmt: skip
    (snapshot / "config.json").write_text(json.dumps(conf))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    code = main(["experiment", "examples/experiments/llama3_8b_extend.yaml", "-o", str(tmp_path / "out"), "--dry-run"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    head = cap.err.splitlines()[0]
    assert "context extension 8192 -> 32768 tokens (yarn, factor 4)" in head
    assert (
        "training ~7,900,000 tokens, 1 epochs, 50 optimizer steps on one process" in head
    )  # 100 documents x (8K + 16K + 24K + 31K) x 1 epoch
    commands = [line for line in cap.out.splitlines() if line.startswith("lm_eval run")]
    base, free, tuned = (model_args(c) for c in commands)
    assert base["max_model_len"] == "8192" and base["metadata"]["lengths"] == [4096, 7680]
    assert base["metadata"]["niah_lengths"] == [4096, 7680]
    assert free["hf_overrides"]["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert free["max_model_len"] == tuned["max_model_len"] == "32768" and tuned["pretrained"].endswith("merged")
    assert not (tmp_path / "out").exists()


def test_shipped_smollm2_extension_plans_niah_and_loss_past_8k(tmp_path, capsys):
    """examples/experiments/smollm2_extend_cpu.yaml: 8K -> 12K with YaRN; NIAH and the continuation loss past the
    window, passkey and short KV inside it; the MDE its header states is the one the dry run prints; the loss runs
    without the chat template; training on passkey documents with the loss on every token."""
    path = Path(__file__).resolve().parents[3] / "examples" / "experiments" / "smollm2_extend_cpu.yaml"
    assert main(["experiment", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith("[needles experiment] cost estimate: context extension 8192 -> 12288 tokens (yarn")
    assert "training ~119,808 tokens" in cap.err  # 3 keys x 3 depths x (2,048 + 11,264) tokens, one epoch
    mde = next(line for line in cap.out.splitlines() if "niah_past_window: MDE" in line)
    printed = float(mde.split("MDE ")[1].split()[0])
    stated = float(path.read_text().split("give an MDE of\n# ")[1].split()[0])
    assert "at n 18" in mde and abs(printed - stated) < 0.0005, (printed, stated)
    assert "loss_past_window: nll (lower is better) on 4 paired documents" in cap.out
    lines = [c for c in cap.out.splitlines() if c.startswith("lm_eval run")]
    assert len(lines) == 5  # base: one call; each extended variant: with and without the chat template
    base, free, free_plain, tuned, tuned_plain = (model_args(c) for c in lines)
    assert base["max_model_len"] == "8192" and base["metadata"]["passkey_lengths"] == [1024]
    assert "niah_single" not in lines[0] and free["metadata"]["niah_lengths"] == [9216]  # past the window only
    assert "needles_long_ppl" not in lines[0] and "--apply_chat_template" in lines[0]
    assert free["max_model_len"] == tuned["max_model_len"] == free_plain["max_model_len"] == "12288"
    assert free_plain["hf_overrides"] == free["hf_overrides"] and tuned_plain["pretrained"].endswith("merged")
    for plain in (lines[2], lines[4]):
        argv = shlex.split(plain)
        assert argv[argv.index("--tasks") + 1] == "needles_long_ppl" and "--apply_chat_template" not in argv
        assert argv[argv.index("--output_path") + 1].endswith("_plain")
    ft = yaml.safe_load(path.read_text())["finetune"]
    assert ft["loss_on"] == "all" and ft["data"]["family"] == "passkey" and "recipe" not in ft


def test_the_pilot_reads_an_extension_target_at_the_edge_of_the_window(tmp_path, model):
    """A target past the window is piloted at the window's edge (a skill the model has at 300 tokens and loses by
    512 has nothing to carry past 512), the guard of the same task at its own length, each reading its own documents
    (tests/workflow/test_pilot.py::test_an_entry_reads_only_its_lengths)."""
    from harness_ext.experiment.config import load_experiment
    from harness_ext.experiment.extension.plan import extension_pilot, plan_extension
    from harness_ext.workflow.pilot import EXTENSION, GUARD
    from harness_ext.workflow.training import finetune_config

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config(model)))
    cfg = load_experiment(tmp_path / "exp.yaml")
    plan = plan_extension(cfg, finetune_config(cfg, tmp_path / "out"))
    argv, pilot_cfg, checked = extension_pilot(cfg, plan, str(model), tmp_path / "out")
    edge = (NATIVE - 64 - 64) // 64 * 64  # the reply (max_gen_toks 64) and the chat template's slack: 384
    assert pilot_cfg.max_model_len == NATIVE and pilot_cfg.metadata["lengths"] == [300, edge]
    assert model_args(shlex.join(argv))["metadata"]["lengths"] == [300, edge]
    assert [(c.kind, c.lengths) for c in checked] == [(EXTENSION, (edge,)), (GUARD, (300,))]
