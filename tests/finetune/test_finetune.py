"""`needles finetune` end to end on a tiny random Llama (real transformers/peft/accelerate, CPU)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_LORA, finetune_argv, with_native_window
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness_ext.cli import main as cli_main
from harness_ext.finetune.config import FinetuneConfig, load_config
from harness_ext.finetune.recipe import finetune
from harness_ext.plugin.runner import VLLM_LORA_RANKS, vllm_lora_rank

EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}


def needles(argv: list[str], capsys) -> tuple[int, str, str]:
    """`needles <argv>` through the real CLI (parser, error printer, exit code)."""
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_args(model: Path, out: Path, *extra: str) -> list[str]:
    return finetune_argv(model, out, *TINY_LORA, "--lora-alpha", "16", *extra, eval_metadata=EVAL_META)


@pytest.fixture(scope="module")
def variants(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the tiny model: no chat template; a 64-token context."""
    root = tmp_path_factory.mktemp("variants")
    no_template = root / "no-template"
    shutil.copytree(tiny_llama_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((no_template / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(conf))
    short = with_native_window(tiny_llama_dir, root / "short-context", 64)
    return {"no_template": no_template, "short": short}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("rank", ["--lora-r", "0"], "LoRA rank r=0 must be positive"),
        ("target", ["--target-modules", "q_proj", "qkv_proj"], "unknown LoRA target module(s) ['qkv_proj']"),
        ("length", [], "the model holds at most 64"),
        ("template", [], "has no chat template"),
        ("max_length", ["--max-length", "100"], "more than max_length=100"),
        ("eval_seed", ["--data-seed", "1000"], "seed of the evaluation set"),
    ],
)
def test_bad_values_fail_before_training(case, extra, message, tiny_llama_dir, variants, tmp_path, capsys):
    model = {"length": variants["short"], "template": variants["no_template"]}.get(case, tiny_llama_dir)
    out = tmp_path / "run"
    code, stdout, stderr = needles(tiny_args(model, out, *extra), capsys)
    assert code == 2, stderr
    assert message in stderr and "fix:" in stderr
    assert "trainable" not in stderr  # the model was never set up for training
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_config_file_and_flags_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2\nlora_r: 32\ndata:\n  num_samples: 50\n  lengths: [512]\n")
    cfg = load_config(path, {"lora_r": 8, "data": {"seed": 7}})
    assert cfg.lora_r == 8 and cfg.data == {"num_samples": 50, "lengths": [512], "seed": 7}
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    with pytest.raises(Exception, match="unknown finetune option"):
        load_config(bad)


def test_vllm_rank_is_read_from_the_adapter():
    assert vllm_lora_rank(8) == 8 and vllm_lora_rank(24) == 32 and vllm_lora_rank(33) == 64
    assert all(vllm_lora_rank(r) >= r for r in range(1, 513)) and set(map(vllm_lora_rank, range(1, 513))) <= set(
        VLLM_LORA_RANKS
    )


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = FinetuneConfig(
        model=str(tiny_llama_dir),
        output_dir=str(out),
        data={"num_samples": 16, "lengths": [128]},
        eval_metadata=EVAL_META,
        lora_r=24,
        lora_alpha=48,
        learning_rate=5e-3,
        batch_size=2,
        epochs=2,
        warmup_ratio=0.0,
        merge=True,
    )
    return out, finetune(cfg, progress=False)


def test_lora_outputs_manifest_and_the_eval_command(lora_run, tiny_llama_dir):
    out, manifest = lora_run
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 24
    assert (adapter / "adapter_model.safetensors").is_file()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["final_loss"] == manifest["final_loss"]
    assert on_disk["base_model"]["path"] == str(tiny_llama_dir)
    assert on_disk["data"]["documents"] == 16 and len(on_disk["data"]["data_sha256"]) == 64
    assert on_disk["leakage_check"]["eval_docs"] == 4 and on_disk["leakage_check"]["overlap"] == 0
    assert on_disk["hyperparameters"]["lora_r"] == 24 and on_disk["hyperparameters"]["learning_rate"] == 5e-3
    assert on_disk["versions"]["peft"] and on_disk["versions"]["transformers"]
    assert on_disk["training"]["steps"] == on_disk["training"]["total_steps"] == 16  # 2 epochs x 8 batches
    log = json.loads((out / "train_log.json").read_text())
    first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (log[:4], log[-4:]))
    assert last < first - 0.05  # it learns (a 64-wide random model: from ~ln(49152), slowly)
    # the exact scoring command: vLLM + the adapter, max_lora_rank rounded up to a rank vLLM accepts
    argv = shlex.split(manifest["eval_command"])
    model_args = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
    assert model_args["pretrained"] == str(tiny_llama_dir)
    assert model_args["lora_local_path"] == str(adapter)
    assert model_args["max_lora_rank"] == "32"
    assert argv[argv.index("--tasks") + 1] == "kv_retrieval_simple"
    assert json.loads(argv[argv.index("--metadata") + 1]) == EVAL_META
    assert "--apply_chat_template" in argv
    script = (out / "eval_command.sh").read_text()
    assert manifest["eval_command"] in script and manifest["eval_command_merged"] in script
    assert f"pretrained={out / 'merged'}," in manifest["eval_command_merged"]


def test_merged_model_equals_base_plus_adapter(lora_run, tiny_llama_dir):
    from peft import PeftModel

    out, _ = lora_run
    ids = torch.tensor([[1, 500, 600, 700, 800]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = merged(ids).logits, peft_model(ids).logits, plain(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # the adapter changed the model
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template


def test_resume_continues_exactly_where_it_stopped(tiny_llama_dir, tmp_path, capsys):
    common = ["--epochs", "1", "--lora-dropout", "0.1", "--warmup-ratio", "0.25"]
    straight = tmp_path / "straight"
    assert needles(tiny_args(tiny_llama_dir, straight, *common), capsys)[0] == 0
    split = tmp_path / "split"
    code, _, err = needles(tiny_args(tiny_llama_dir, split, *common, "--stop-after-steps", "2"), capsys)
    assert code == 0 and "continue with --resume" in err
    assert not (split / "adapter").exists() and (split / "checkpoints" / "step-2").is_dir()
    # a checkpoint keeps only the adapter weights, not a copy of the frozen base model
    ckpt = load_file(split / "checkpoints" / "step-2" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)
    # the documents may be checked against another suite on resume (the leakage check runs again), and gradient
    # checkpointing may be turned on (memory only): the same weights as the uninterrupted run below
    other = ["--eval-tasks", "kv_retrieval_simple_template", "--gradient-checkpointing"]
    code, stdout, err = needles(tiny_args(tiny_llama_dir, split, *common, "--resume", *other), capsys)
    assert code == 0 and "resumed from" in err and "lora_local_path=" in stdout
    assert "kv_retrieval_simple_template" in err  # what the leakage check read this time
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(split / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    la = [r["loss"] for r in json.loads((straight / "train_log.json").read_text())]
    lb = [r["loss"] for r in json.loads((split / "train_log.json").read_text())]
    assert la == pytest.approx(lb, rel=1e-5) and len(la) == 4
    # resuming with another training option is refused
    code, _, err = needles(tiny_args(tiny_llama_dir, split, *common, "--resume", "--lr", "1e-3"), capsys)
    assert code == 2 and "written with another configuration" in err


def test_full_finetuning_saves_a_loadable_model_and_its_eval_command(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "full"
    code, stdout, err = needles(
        tiny_args(
            tiny_llama_dir, out, "--method", "full", "--max-steps", "2", "--gradient-checkpointing", "--grad-accum", "2"
        ),
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["training"]["steps"] == 2
    model_args = shlex.split(manifest["eval_command"])
    args = model_args[model_args.index("--model_args") + 1]
    assert f"pretrained={out / 'model'}," in args and "lora_local_path" not in args
    tuned = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        diff = max(float((p - q).abs().max()) for p, q in zip(tuned.parameters(), base.parameters(), strict=True))
    assert diff > 0


def test_shipped_configs_parse_and_validate():
    """examples/: every finetune recipe passes validation; every accelerate file is one accelerate reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    from harness_ext.experiment.loop import DEFAULT_TRAINING
    from harness_ext.finetune.config import validate_hparams
    from harness_ext.finetune.data import train_spec

    root = Path(__file__).resolve().parents[2] / "examples"
    recipes = sorted((root / "finetune").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        cfg = load_config(path)
        validate_hparams(cfg)
        train_spec(cfg.data)
    # the documented CPU recipe is the one `needles loop` runs
    cpu = load_config(root / "finetune" / "smollm2_kv_lora.yaml")
    assert {k: getattr(cpu, k) for k in DEFAULT_TRAINING if k != "data"} == {
        k: v for k, v in DEFAULT_TRAINING.items() if k != "data"
    }
    assert DEFAULT_TRAINING["data"].items() <= cpu.data.items()
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in (root / "accelerate").glob("*.yaml")}
    assert kinds == {"FSDP", "DEEPSPEED"}
