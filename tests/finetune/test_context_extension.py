"""Context extension, fast part: the ``context`` section of ``needles finetune`` checked against a
model's config.json before anything loads, both RoPE config forms read and written, the RoPE keys checked
against transformers' own validators, the eval command's ``hf_overrides`` as lm_eval parses it, and the length
guard's served window. Nothing here trains or starts an engine (the heavy half:
tests/finetune/test_context_extension_serving.py)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaConfig

from harness_ext.cli import main as cli_main
from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.args import finetune_parser, overrides_from_args
from harness_ext.finetune.config import FinetuneConfig, load_config
from harness_ext.finetune.context import extended_config, plan_context
from harness_ext.finetune.long_sequences import length_bucket
from harness_ext.finetune.long_sequences import use_gradient_checkpointing as checkpointing
from harness_ext.plugin.rope_guard import refuse_past_window, served_config
from harness_ext.plugin.runner import vllm_eval_command

NATIVE = 512


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose config.json has ``changes`` (a key set to None is removed)."""
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = value
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.fixture(scope="module")
def small(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a 512-token native window (transformers 5 form: rope_parameters)."""
    return with_config(tiny_llama_dir, tmp_path_factory.mktemp("ctx") / "small", max_position_embeddings=NATIVE)


@pytest.fixture(scope="module")
def small_legacy(tiny_llama_dir, tmp_path_factory) -> Path:
    """The same window in the 4.x form: top-level rope_theta, no rope_parameters."""
    root = tmp_path_factory.mktemp("ctx-legacy")
    return with_config(
        tiny_llama_dir, root / "legacy", max_position_embeddings=NATIVE, rope_parameters=None, rope_theta=50000.0
    )


def needles(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad values: exit 2
BAD = [
    (["--context-length", "1024", "--rope-type", "ntk"], "unknown context.rope.type 'ntk'", "use one of"),
    (
        ["--context-length", "1024", "--rope-type", "yarn", "--rope-factor", "0.5"],
        "context.rope.factor=0.5 must be at least 1",
        "ceil",
    ),
    (["--context-length", "512", "--rope-type", "yarn"], "context.length=512 is not past the native window 512", ""),
    (["--context-length", "400", "--rope-type", "linear"], "context.length=400 is not past", "drop context.rope"),
    (["--context-length", "1024", "--rope-type", "linear", "--rope-beta-fast", "16"], "context.rope.beta_fast", "yarn"),
    (
        ["--context-length", "1024", "--rope-type", "yarn", "--rope-low-freq-factor", "1"],
        "rope.low_freq_factor",
        "llama3",
    ),
    (
        ["--context-length", "1024", "--rope-type", "linear", "--rope-original-max-position-embeddings", "512"],
        "context.rope.original_max_position_embeddings is not a parameter of linear",
        "yarn or llama3",
    ),
    (["--context-length", "1024", "--rope-type", "dynamic"], "context.rope.type dynamic cannot be trained", "yarn"),
    (["--context-length", "1024", "--rope-type", "theta", "--rope-factor", "2"], "context.rope.factor is not", ""),
    (
        ["--context-length", "1024", "--rope-type", "yarn", "--rope-theta", "-1"],
        "context.rope.theta=-1.0 must be positive",
        "",
    ),
    (["--context-length", "1500", "--rope-type", "yarn", "--rope-factor", "2"], "window of 1024 tokens", "3 or more"),
    (["--context-length", "1024"], "past the native window 512", "--rope-type yarn"),
    (["--context-length", "0", "--rope-type", "yarn"], "context.length=0 must be positive", ""),
    (
        ["--context-length", "1024", "--rope-type", "llama3", "--rope-high-freq-factor", "0.5"],
        "high_freq_factor=0.5",
        "",
    ),
    (["--context-length", "1024", "--rope-type", "yarn", "--rope-beta-fast", "1"], "beta_fast=1 must be above", ""),
    (["--context", '{"lenght": 1024}'], "unknown context key(s) ['lenght']", "context.length"),
    (
        ["--context", '{"length": 1024, "rope": {"type": "yarn", "factor": "two"}}'],
        "context.rope.factor='two' is not a number",
        "",
    ),
    (
        ["--context", '{"length": 1024, "rope": {"type": "yarn", "original_max_position_embeddings": 500.5}}'],
        "is not a whole number",
        "",
    ),
    (["--context", '{"rope": {"type": "yarn"}}'], "context.length is missing", "--context-length"),
]


@pytest.mark.parametrize("flags, problem, fix", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_every_bad_context_value_exits_2_naming_the_key_before_anything_loads(
    small, tmp_path, capsys, flags, problem, fix
):
    out = tmp_path / "run"
    code, err = needles(["finetune", "--model", str(small), "-o", str(out), *flags], capsys)
    assert code == 2, err
    error_line = err.split("needles: error: ", 1)[1].split("\n", 1)[0]
    assert problem in error_line and "context" in error_line and "\n  fix: " in err
    assert fix in err.split("fix:", 1)[1]
    assert "Traceback" not in err
    assert not out.exists()  # refused before the output folder is claimed, let alone a model loaded


def test_a_model_already_scaled_is_refused_and_an_unreadable_config_is_named(tiny_llama_dir, tmp_path):
    scaled = with_config(
        tiny_llama_dir,
        tmp_path / "scaled",
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    )
    with pytest.raises(NeedlesError, match="already uses linear RoPE scaling \\(window 2048\\)"):
        plan_context({"length": 4096, "rope": {"type": "yarn"}}, str(scaled))
    with pytest.raises(NeedlesError, match="cannot read config.json"):
        plan_context({"length": 4096, "rope": {"type": "yarn"}}, str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------- the plan per type
def test_defaults_factor_ceil_length_over_native_and_original_the_declared_window(small):
    plan = plan_context({"length": 1300, "rope": {"type": "yarn"}}, str(small))
    assert plan.rope == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,  # the tiny model's own base frequency (LlamaConfig's default)
        "factor": 3.0,  # ceil(1300 / 512)
        "original_max_position_embeddings": NATIVE,
    }
    assert (plan.native, plan.window, plan.max_position_embeddings) == (NATIVE, 1536, 1536)
    linear = plan_context({"length": 1300, "rope": {"type": "linear"}}, str(small))
    # vLLM multiplies max_position_embeddings by a linear factor: the declared window stays
    assert (linear.max_position_embeddings, linear.window, linear.rope["factor"]) == (NATIVE, 1536, 3.0)
    llama3 = plan_context({"length": 2048, "rope": {"type": "llama3", "high_freq_factor": 8}}, str(small))
    assert llama3.rope["low_freq_factor"] == 1.0 and llama3.rope["high_freq_factor"] == 8.0
    assert (llama3.rope["factor"], llama3.window) == (4.0, 2048)
    theta = plan_context({"length": 2048, "rope": {"type": "theta", "theta": 8.0e6}}, str(small))
    assert theta.rope == {"rope_type": "default", "rope_theta": 8.0e6} and theta.window == 2048
    inside = plan_context({"length": 256}, str(small))  # no extension asked: nothing to override
    assert inside.hf_overrides() is None and inside.config_kwargs() == {} and inside.window == NATIVE


@pytest.mark.parametrize(
    "rope",
    [
        {"type": "yarn", "beta_fast": 16, "attention_factor": 1.2},
        {"type": "linear"},
        {"type": "llama3"},
        {"type": "theta"},
    ],
)
def test_every_plan_passes_transformers_own_rope_validation_without_a_warning(small, rope, caplog):
    plan = plan_context({"length": 1024, "rope": rope}, str(small))
    logger = logging.getLogger("transformers.modeling_rope_utils")  # transformers' loggers do not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            conf = AutoConfig.from_pretrained(small, **plan.config_kwargs())
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "rope" in r.getMessage().lower()], caplog.text
    assert conf.rope_parameters == plan.rope and conf.max_position_embeddings == plan.max_position_embeddings


@pytest.mark.parametrize("rope_type", sorted(ropelib.TYPE_KEYS))
def test_the_accepted_keys_are_exactly_transformers(rope_type, caplog):
    """Our table against transformers' validators: every key of ours is recognised, a foreign one is not."""
    values = {"factor": 2.0, "original_max_position_embeddings": 512, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params = {"rope_type": rope_type, "rope_theta": 1e4, "bogus_key": 1.0}
    params |= {k: values.get(k, 1.0) for k in ropelib.TYPE_KEYS[rope_type]}
    if rope_type == "yarn":
        params |= {"beta_fast": 32.0, "beta_slow": 1.0}
    validate = getattr(LlamaConfig(max_position_embeddings=1024), f"_validate_{rope_type}_rope_parameters")
    logger = logging.getLogger("transformers.modeling_rope_utils")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            validate(params)
    finally:
        logger.removeHandler(caplog.handler)
    unrecognised = {r.getMessage() for r in caplog.records if "Unrecognized keys" in r.getMessage()}
    assert len(unrecognised) == 1 and "{'bogus_key'}" in unrecognised.pop()


# ------------------------------------------------------------------------------------- both config forms
def test_both_config_forms_read_the_same_rope_and_window(small, small_legacy):
    new = ropelib.read_config_json(small)
    old = ropelib.read_config_json(small_legacy)
    assert "rope_parameters" in new and "rope_parameters" not in old and old["rope_theta"] == 50000.0
    assert ropelib.read_rope(old) == {"rope_type": "default", "rope_theta": 50000.0}
    assert ropelib.rope_window(old) == ropelib.rope_window(new) == NATIVE
    # what transformers makes of the old form is what we read
    assert AutoConfig.from_pretrained(small_legacy).rope_parameters == ropelib.read_rope(old)
    legacy_scaled = {
        "max_position_embeddings": 4096,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 4},
    }
    assert ropelib.read_rope(legacy_scaled) == {"rope_type": "linear", "factor": 4, "rope_theta": 5e5}
    assert ropelib.rope_window(legacy_scaled) == 16384  # vLLM's rule: max_position_embeddings x linear factor
    # the extension of the legacy model keeps its base frequency
    plan = plan_context({"length": 1024, "rope": {"type": "yarn"}}, str(small_legacy))
    assert plan.rope["rope_theta"] == 50000.0


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "llama3", "theta"])
def test_the_4x_form_written_reads_back_as_the_same_rope(small, rope_type):
    rope = {"type": rope_type, **({"theta": 2e6} if rope_type == "theta" else {})}
    plan = plan_context({"length": 2048, "rope": rope}, str(small))
    legacy = ropelib.config_kwargs(plan.rope, plan.max_position_embeddings, form="rope_scaling")
    assert "rope_parameters" not in legacy and legacy["rope_theta"] == plan.rope["rope_theta"]
    assert LlamaConfig(**legacy).rope_parameters == plan.rope  # transformers 5 reads the 4.x form back
    assert ropelib.config_form() == "rope_parameters"  # the installed transformers (5.x) writes the new form


def test_extended_config_is_the_model_config_with_the_plan(small):
    plan = plan_context({"length": 1024, "rope": {"type": "yarn"}}, str(small))
    conf = extended_config(str(small), plan)
    assert conf.rope_parameters == plan.rope and conf.max_position_embeddings == 1024
    assert conf.hidden_size == 64 and conf.num_hidden_layers == 2  # nothing else changed
    assert ropelib.rope_window(conf.to_dict()) == plan.window
    assert extended_config(str(small), None) is None


# ------------------------------------------------------------------------------------- flags and YAML
def test_flags_set_keys_inside_the_context_section_and_merge_with_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("context:\n  length: 16384\n  rope: {type: yarn, beta_fast: 16}\n")
    args = finetune_parser().parse_args(["--rope-factor", "4", "--context-length", "32768"])
    cfg = load_config(yaml_file, overrides_from_args(args))
    assert cfg.context == {"length": 32768, "rope": {"type": "yarn", "beta_fast": 16, "factor": 4.0}}
    assert FinetuneConfig().context == {} and FinetuneConfig().gradient_checkpointing is None


def test_gradient_checkpointing_turns_on_above_the_threshold_unless_set():
    cfg = FinetuneConfig()
    assert not checkpointing(cfg, 2048) and checkpointing(cfg, 2049)
    assert checkpointing(FinetuneConfig(gradient_checkpointing_above=512), 600)
    assert not checkpointing(FinetuneConfig(gradient_checkpointing=False), 100_000)
    assert checkpointing(FinetuneConfig(gradient_checkpointing=True), 10)


_METER_RUN = """
import json
from harness_ext.finetune.long_sequences import LengthMeter
meter = LengthMeter("cpu")
meter.start()
block = bytearray(64 * 2**20)  # 64 MiB touched inside the step: the step's peak must hold it
block[::4096] = b"x" * len(block[::4096])
meter.stop(700, 1400)
del block
meter.start()
meter.stop(300, 600)
print(json.dumps(meter.summary()))
"""


def test_length_meter_records_tokens_per_second_and_peak_rss_per_length():
    # in a fresh interpreter, as in a training run: a long-lived test worker's own heap (GBs after in-process
    # training in another test) made its resident-set peaks move in ways a training process's do not
    proc = subprocess.run([sys.executable, "-c", _METER_RUN], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert list(summary) == ["up_to_512", "up_to_1024"] and length_bucket(1024) == 1024 and length_bucket(1025) == 2048
    long, short = summary["up_to_1024"], summary["up_to_512"]
    assert long["memory"] == "rss_peak_per_step" and long["longest_sequence"] == 700 and long["tokens"] == 1400
    assert long["peak_memory_mb"] >= short["peak_memory_mb"] + 50  # the peak is the step's own, reset between steps
    assert long["tokens_per_second"] > 0


# ------------------------------------------------------------------------------------- serving
def test_the_eval_command_carries_the_override_as_lm_eval_parses_it(small):
    from lm_eval._cli.utils import MergeDictAction

    plan = plan_context({"length": 1024, "rope": {"type": "yarn"}}, str(small))
    argv = vllm_eval_command(
        str(small), ["kv_retrieval_simple"], {"lengths": [800]}, 1024, hf_overrides=plan.hf_overrides()
    )
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction)  # lm_eval run's own action
    i = argv.index("--model_args")
    parsed = parser.parse_known_args(argv[i : i + 3])[0].model_args
    assert parsed["hf_overrides"] == {"rope_parameters": plan.rope, "max_position_embeddings": 1024}
    assert parsed["max_model_len"] == 1024 and parsed["pretrained"] == str(small)


def test_the_guard_window_is_the_served_one(small):
    plan = plan_context({"length": 1024, "rope": {"type": "yarn"}}, str(small))
    assert refuse_past_window(served_config(small, plan.hf_overrides()), 1024, small) == 1024
    assert refuse_past_window(served_config(small, json.dumps(plan.hf_overrides())), 1024, small) == 1024
    assert refuse_past_window(served_config(small, None), 512, small) == NATIVE
    with pytest.raises(NeedlesError) as exc:
        refuse_past_window(served_config(small, None), 1024, small)
    assert "max_model_len=1024 is past the RoPE window 512" in exc.value.problem
    suggested = json.loads(exc.value.fix.split("hf_overrides=", 1)[1].split("'", 1)[0])
    assert suggested == plan.hf_overrides()  # the fix names the override needles finetune would train with


def test_the_openai_backend_refuses_a_context_section(small, tmp_path, capsys):
    argv = ["finetune", "--backend", "openai", "--model", str(small), "-o", str(tmp_path / "o")]
    code, err = needles([*argv, "--context-length", "1024", "--rope-type", "yarn"], capsys)
    assert code == 2 and "applies to local training only" in err and "--backend openai" in err


# ------------------------------------------------------------------------------------- past one device
CP_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp2_context_parallel.yaml"


def test_the_shipped_context_parallel_config_is_built_by_accelerate_and_refused_on_cpu(
    small, tmp_path, capsys, monkeypatch
):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils.launch import prepare_multi_gpu_env

    # what `accelerate launch --config_file ... -m harness_ext.finetune` builds, by accelerate's own code
    args = launch_command_parser().parse_args(["--config_file", str(CP_CONFIG), "-m", "harness_ext.finetune"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.fsdp_version == 2 and args.use_parallelism_config
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_", "PARALLEL"))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mesh = ParallelismConfig()  # reads the launch environment; its __post_init__ validates sizes and backends
    assert mesh.cp_enabled and (mesh.dp_shard_size, mesh.cp_size) == (4, 2)
    assert mesh.total_size == args.num_processes == 8  # the mesh covers every launched process
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "1")
    with pytest.raises(ValueError, match="pure data parallelism"):  # the same validation catches a broken one
        ParallelismConfig()
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "4")

    # this machine has no GPU: needles refuses before accelerate builds a device mesh, naming why and what works
    out = tmp_path / "cp"
    code, err = needles(
        ["finetune", "--model", str(small), "-o", str(out), "--context-length", "1024", "--rope-type", "yarn"], capsys
    )
    assert code == 2 and "sequence parallelism (cp_size=2), which needs CUDA GPUs" in err
    assert "--gradient-checkpointing-above" in err.split("fix:", 1)[1] and "Traceback" not in err
    assert not out.exists()
