"""Run the real ``lm_eval`` CLI in a subprocess and find what it wrote (demo, tests, CI), and build the
vLLM command lines that score a base model, a LoRA adapter or a finetuned model folder (and the one that scores a
model behind an OpenAI-compatible endpoint)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.core.rope import read_config_json
from harness_ext.plugin.lm_eval_progress import ProgressEcho, follow

# Engine options that matter for vLLM on a CPU-only machine (see README, "vLLM on CPU").
VLLM_CPU_ARGS = "dtype=float32,gpu_memory_utilization=0.3,enforce_eager=True,max_model_len={max_model_len}"


def vllm_model_args(pretrained: str | Path, max_model_len: int = 4096, extra: str = "") -> str:
    args = f"pretrained={pretrained}," + VLLM_CPU_ARGS.format(max_model_len=max_model_len)
    return f"{args},{extra}" if extra else args


def lm_eval_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and (cores := cpu_bind_all()):
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        if vllm_cpu_build():
            # vLLM's documented switch: the engine runs inside the lm_eval process. Its default spawns an engine
            # process and a worker process, each importing torch and vLLM again: 25-40 s more per launch on 2
            # cores, where the front end has no core of its own anyway (all are bound to the engine above).
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def vllm_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (``vllm-cpu`` registers as ``vllm <version>+cpu``)."""
    import importlib.metadata as md

    try:
        return md.version("vllm").endswith("+cpu")
    except md.PackageNotFoundError:
        return False


def cpu_bind_all(max_cores: int = 4) -> str | None:
    """All cores this process may use, as a VLLM_CPU_OMP_THREADS_BIND value, on a small machine (else None).

    vLLM-CPU's ``auto`` binding reserves one core for its front end: on 2 cores that idles half the machine
    (measured here: prefill 225 -> 407 tokens/s with both cores bound; the front end mostly waits). On larger
    machines ``auto`` (NUMA-aware, one core of many) is left alone.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not 1 < len(cores) <= max_cores:
        return None
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def run_lm_eval(
    args: list[str],
    output_path: Path,
    log_file: Path | None = None,
    timeout: int = 1800,
    progress: str | None = "lm_eval",
    env: dict[str, str] | None = None,
) -> Path:
    """Run ``lm_eval run ARGS --output_path OUTPUT`` and return the newest results JSON. With a ``log_file``, the
    output goes there and the progress bars show on stderr as ``  PROGRESS: 8/18 prompts, ...`` (None: silent).
    ``env``: variables the command needs on top of this process's (e.g. :func:`eval_env`'s)."""
    cmd = [sys.executable, "-m", "lm_eval", "run", *args, "--output_path", str(output_path)]
    run_env = lm_eval_env({**os.environ, **(env or {})})
    if log_file:
        echo = ProgressEcho(progress) if progress else None
        proc = follow(cmd, run_env, Path(log_file), timeout, echo)
    else:
        try:
            proc = subprocess.run(
                cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise NeedlesError(
                f"lm_eval ran past its {timeout} s limit and was stopped",
                fix="give the step more time or score fewer prompts (--limit)",
            ) from None
    if proc.returncode != 0:
        tail = (Path(log_file).read_text(errors="replace") if log_file else proc.stdout or "")[-4000:]
        raise NeedlesError(f"lm_eval exited with {proc.returncode}:\n{tail}", fix="read the log above")
    return latest_results(output_path)


def latest_results(output_path: Path) -> Path:
    found = sorted(glob.glob(str(Path(output_path) / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise NeedlesError(f"no results_*.json under {output_path}", fix="check that lm_eval ran")
    return Path(found[-1])


def load_results(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------- scoring a finetuned model
# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks); lm-eval's default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_LORA_CHUNK = 512  # vLLM max_num_batched_tokens when serving a LoRA adapter on CPU


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise NeedlesError(
        f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}",
        fix="train with a smaller rank or score the merged model (--merge)",
    )


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest rank in a saved peft adapter (rank_pattern included)."""
    with open(Path(adapter_dir) / "adapter_config.json", encoding="utf-8") as f:
        conf = json.load(f)
    ranks = [int(conf["r"]), *(int(v) for v in (conf.get("rank_pattern") or {}).values())]
    return max(ranks)


# Below this many full-window sequences in the KV cache, long prompts could evict each other (see cpu_max_num_seqs).
CPU_FULL_WINDOWS = 8


def cpu_max_num_seqs(config: dict | None, max_model_len: int, kv_space_gib: float | None = None) -> int | None:
    """vLLM ``max_num_seqs`` for a long window on the CPU build: how many sequences of ``max_model_len`` tokens the
    KV cache holds (``VLLM_CPU_KVCACHE_SPACE``, the plugin's 2 GiB by default), when that is fewer than
    ``CPU_FULL_WINDOWS``; None otherwise (vLLM's own default), or without the model's config.

    Why: vLLM's scheduler admits a waiting request as soon as its first prefill chunk fits, then preempts a running
    one when the cache runs out, and a preempted request starts its prefill again from token 0. Measured on the
    2-core machine (benchmarks/bench_vllm_cpu_long.py, docs/vllm-cpu.md): vLLM's defaults did not preempt on 3 x
    15.9K or 12 x 7.7K prompts and the cap ran at the same speed (0.98-1.00x); it is kept as a guard for workloads
    that do fill the cache, at no measured cost."""
    if not config:
        return None
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    if kv_space_gib is None:
        kv_space_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 2)
    per_token = 2 * layers * kv_heads * head_dim * 4  # K and V, float32 (VLLM_CPU_ARGS)
    fits = int(kv_space_gib * 2**30 // (per_token * max_model_len))
    return max(1, fits) if fits < CPU_FULL_WINDOWS else None


def vllm_eval_command(
    base: str,
    eval_tasks: list[str],
    eval_metadata: dict,
    max_model_len: int,
    adapter: Path | None = None,
    merged: Path | None = None,
    output_path: Path | None = None,
    on_gpu: bool = False,
    lora_rank: int | None = None,
    hf_overrides: dict | None = None,
    chat_template: bool = True,
) -> list[str]:
    """The lm_eval argv that scores a model with vLLM: ``base``, a peft adapter on it (lora_local_path,
    max_lora_rank read from the adapter, or from ``lora_rank`` for an adapter still to be trained), or a
    ``merged`` / fully finetuned model folder. ``hf_overrides`` (e.g. a RoPE extension,
    ``harness_ext.core.rope.vllm_overrides``) changes the served config. It travels as a second ``--model_args``
    value, ``hf_overrides={...}``: lm_eval 0.4.13 reads a first value holding ``{`` as a whole JSON object and
    refuses anything else, while later values are ``key=value`` pairs whose value it reads as a Python literal
    (a JSON object of strings and numbers is one); vLLM applies the dict to the model's config. ``chat_template``
    False leaves out ``--apply_chat_template`` (tasks scored on plain text, such as needles_long_ppl)."""
    pretrained = str(merged) if merged else base
    extra = ""
    if adapter is not None and merged is None:
        rank = lora_rank if lora_rank is not None else adapter_rank(adapter)
        extra = f"lora_local_path={adapter},max_lora_rank={vllm_lora_rank(rank)}"
    if on_gpu:
        args = f"pretrained={pretrained},max_model_len={max_model_len}" + (f",{extra}" if extra else "")
    else:
        if extra:
            # vLLM's CPU LoRA kernels gather one weight copy per token of a prefill chunk: small chunks
            # keep those temporaries in cache (measured here: ~1.8x faster than the default 4096)
            extra += f",max_num_batched_tokens={CPU_LORA_CHUNK}"
        cap = cpu_max_num_seqs(read_config_json(pretrained) or read_config_json(base), max_model_len)
        if cap is not None:
            extra = f"{extra},max_num_seqs={cap}" if extra else f"max_num_seqs={cap}"
        args = vllm_model_args(pretrained, max_model_len, extra)
    cmd = ["lm_eval", "run", "--tasks", ",".join(eval_tasks), "--model", "vllm", "--model_args", args]
    if hf_overrides:
        cmd.append("hf_overrides=" + json.dumps(hf_overrides, separators=(",", ":"), sort_keys=True))
    if chat_template:
        cmd.append("--apply_chat_template")
    if eval_metadata:
        cmd += ["--metadata", json.dumps(eval_metadata, separators=(",", ":"))]
    if output_path is not None:
        cmd += ["--output_path", str(output_path)]
    # --batch_size auto: vLLM gets every request at once (lm_eval's default of 1 is ~10x slower on CPU)
    return cmd + ["--batch_size", "auto", "--log_samples"]


def api_eval_command(
    model: str,
    chat_url: str,
    tokenizer: str,
    eval_tasks: list[str],
    eval_metadata: dict,
    max_length: int,
    output_path: Path | None = None,
) -> list[str]:
    """The lm_eval argv that scores ``model`` behind an OpenAI-compatible chat-completions URL (lm-eval's
    ``local-chat-completions``: the server applies its own chat template to ``--apply_chat_template``'s messages).

    ``tokenizer`` rides in ``--model_args`` for the plugin's tasks, which read it from the merged metadata to size
    every prompt to its exact token length; lm-eval's chat class itself ignores it (no tokenizer backend, so it
    neither truncates nor re-tokenizes). ``max_length`` records the served window (lm-eval's API default is 2048).
    The API key is never an argument: lm-eval reads ``OPENAI_API_KEY`` from the environment."""
    args = f"model={model},base_url={chat_url},tokenizer={tokenizer},max_length={max_length},max_retries=3"
    cmd = ["lm_eval", "run", "--tasks", ",".join(eval_tasks), "--model", "local-chat-completions"]
    cmd += ["--model_args", args, "--apply_chat_template"]
    if eval_metadata:
        cmd += ["--metadata", json.dumps(eval_metadata, separators=(",", ":"))]
    if output_path is not None:
        cmd += ["--output_path", str(output_path)]
    # no --batch_size: chat completions take one conversation per request (lm-eval forces 1)
    return cmd + ["--log_samples"]


def eval_env(served: str | Path, max_model_len: int) -> dict[str, str]:
    """Environment the eval command needs: ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` only where vLLM would refuse the
    length although the served RoPE holds it (the tokenizer's ``model_max_length`` caps vLLM's window)."""
    from harness_ext.core.rope import tokenizer_max_length

    cap = tokenizer_max_length(served)
    return {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} if cap is not None and max_model_len > cap else {}


def shell_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The argv as one shell line, prefixed with its environment (``VAR=value lm_eval ...``)."""
    import shlex

    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    return (prefix + " " if prefix else "") + shlex.join(argv)
