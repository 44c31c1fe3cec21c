"""How a workflow runs one ``lm_eval`` evaluation: in the environment ``needles finetune`` prints beside its eval
commands, and with a time limit that follows the cost estimate.

**Environment.** ``harness_ext.plugin.runner.eval_env`` (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` where the served
model's tokenizer caps vLLM's window below ``max_model_len``) travels in the step's command itself, as
``env VAR=value lm_eval run ...`` (:func:`with_env`): ``plan.json`` and ``--dry-run`` show a command that runs as
printed, and :func:`run_eval` hands those variables to the subprocess.

**Time limit** (:func:`eval_timeout`): ``max(1800, 4 x estimate) + 1800 x tasks not estimated``, in seconds, where
the estimate is harness_ext.workflow.cost's count of the command's prompt and generated tokens at the speeds
measured for SmolLM2-135M with vLLM on the 2-core CPU machine (docs/extension.md, "Measured": the 16K evaluation
prefilled ~280 prompt tokens/s; 38 prompts took 1,194-1,214 s) plus 120 s to start the engine, scaled on the CPU
engine by the model's size against SmolLM2-135M's (layers x hidden size squared). The factor 4 leaves room for a
machine shared with other work (niced work beside vLLM-CPU slowed it 2-3x); tasks whose data is read at run time
(MDQA, FLenQA, lm-eval's own) are not counted and add 1800 s each. ``NEEDLES_EVAL_TIMEOUT_S`` replaces the rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness_ext.core.errors import NeedlesError

TIMEOUT_FLOOR_S = 1800  # never less than the limit every evaluation had before it was sized
SAFETY = 4
PROMPT_TOKENS_PER_S = 280.0  # vLLM-CPU prefill, SmolLM2-135M, 4K-16K prompts (docs/extension.md)
GENERATED_TOKENS_PER_S = 10.0  # decode, counted at every task's max_gen_toks (an upper bound of what it writes)
STARTUP_S = 120.0  # vLLM engine start and the plugin's prompt building
UNKNOWN_TASK_S = 1800  # a task the estimate cannot size
REFERENCE_SIZE = 30 * 576**2  # SmolLM2-135M: layers x hidden_size squared
TIMEOUT_ENV = "NEEDLES_EVAL_TIMEOUT_S"


def with_env(argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` run under ``env``: ``["env", "K=V", ..., *argv]`` (``argv`` itself when ``env`` is empty)."""
    return ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *argv] if env else list(argv)


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(environment, command) of a :func:`with_env` command."""
    if not argv or argv[0] != "env":
        return {}, list(argv)
    env, i = {}, 1
    while i < len(argv) and "=" in argv[i] and not argv[i].startswith("-"):
        key, _, value = argv[i].partition("=")
        env[key] = value
        i += 1
    return env, list(argv[i:])


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def _size_factor(model_args: str) -> float:
    """How much slower than SmolLM2-135M the CPU engine runs this model (1 on a GPU or when unknown)."""
    from harness_ext.core.rope import read_config_json

    if "enforce_eager=True" not in model_args:  # vllm_eval_command's CPU engine options; a GPU is far faster
        return 1.0
    pretrained = next((a.split("=", 1)[1] for a in model_args.split(",") if a.startswith("pretrained=")), None)
    config = read_config_json(pretrained) if pretrained else None
    try:
        size = int(config["num_hidden_layers"]) * int(config["hidden_size"]) ** 2  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return 1.0
    return max(1.0, size / REFERENCE_SIZE)


def eval_timeout(argv: list[str]) -> int:
    """Seconds an evaluation command may run (module docstring), from its own ``--tasks``, ``--metadata``,
    ``--limit`` and ``--model_args``."""
    from harness_ext.workflow.cost import eval_rows

    if (fixed := os.environ.get(TIMEOUT_ENV)) is not None:
        try:
            return max(1, int(float(fixed)))
        except ValueError:
            raise NeedlesError(
                f"{TIMEOUT_ENV}={fixed!r} is not a number of seconds", fix=f"e.g. {TIMEOUT_ENV}=7200"
            ) from None
    _, argv = split_env(argv)
    tasks = [t for t in (_option(argv, "--tasks") or "").split(",") if t]
    metadata = json.loads(_option(argv, "--metadata") or "{}")
    limit = _option(argv, "--limit")
    rows, unknown = eval_rows(tasks, metadata, int(float(limit)) if limit and float(limit) >= 1 else None)
    prompt = sum(r["prompt_tokens"] for r in rows)
    generated = sum(r["max_generated_tokens"] for r in rows)
    seconds = STARTUP_S + prompt / PROMPT_TOKENS_PER_S + generated / GENERATED_TOKENS_PER_S
    seconds *= _size_factor(_option(argv, "--model_args") or "")
    return int(max(TIMEOUT_FLOOR_S, SAFETY * seconds)) + UNKNOWN_TASK_S * len(unknown)


def run_eval(argv: list[str], out: Path, log_file: Path | None = None, progress: str | None = None) -> Path:
    """Run a workflow's evaluation command (``[env K=V ...] lm_eval run ... --output_path X``) into ``out``, with
    its environment and :func:`eval_timeout`; returns the results file."""
    from harness_ext.plugin.runner import run_lm_eval

    env, command = split_env(argv)
    args = list(command[2:])  # drop "lm_eval run"
    if "--output_path" in args:
        i = args.index("--output_path")
        del args[i : i + 2]
    log = log_file or out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return run_lm_eval(args, out, log_file=log, progress=progress or out.name, env=env, timeout=eval_timeout(argv))
