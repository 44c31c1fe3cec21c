"""What a finished finetune leaves for scoring: output files and hashes, and the ``lm_eval`` commands that score
the adapter, the merged or full model and, for a context extension, the untrained model with the same RoPE
(the training-free variant), each with exactly the RoPE and window the run trained with.

A context extension's commands score the lengths it was extended to: a ladder from half the native window to the
longest prompt the new window holds (:func:`length_ladder`), in each evaluation task family's length key (unless
``eval_metadata`` sets it), with ``max_model_len`` covering the longest, and a passkey and a NIAH line at the same
lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness_ext.core.atomic_io import write_atomic
from harness_ext.data.dataset_cache import file_sha256
from harness_ext.finetune.context import ContextPlan
from harness_ext.finetune.manifest import eval_max_model_len
from harness_ext.plugin.runner import adapter_rank, eval_env, shell_command, vllm_eval_command

# tokens a chat template adds around a prompt (SmolLM2's system turn is ~30), as the extension experiment counts
CHAT_SLACK = 64
# evaluation family -> (its --metadata key of token lengths, its max_gen_toks), for the families finetune scores
LENGTH_KEYS = {
    "kv_retrieval": ("lengths", 64),
    "synth_mdqa": ("synth_lengths", 100),
    "needles_passkey": ("passkey_lengths", 16),
    "niah": ("niah_lengths", 50),
}
# retrieval tasks scored at the ladder's lengths, each on its own line (NIAH's haystack is a download, and a
# missing one must not stop the others)
LONG_TASKS = ("needles_passkey", "niah")


def length_family(task: str) -> str | None:
    """The family of :data:`LENGTH_KEYS` a task belongs to (by name), or None (no token-length key)."""
    return next((f for f in LENGTH_KEYS if task == f or task.startswith(f + "_")), None)


def length_ladder(native: int, window: int, room: int) -> list[int]:
    """Prompt lengths that test an extension: half the native window, the longest inside it, 1.5x it, then
    2x, 4x, ... it, and the longest the new window holds (each length plus ``room`` tokens of answer and chat
    template fits its window)."""
    top = window - room
    rungs = {native // 2, native - room, native * 3 // 2}
    multiple = 2
    while native * multiple < top:
        rungs.add(native * multiple)
        multiple *= 2
    rungs.add(top)
    return sorted(r for r in rungs if 0 < r <= top)


def extension_metadata(tasks: list[str], eval_metadata: dict, context: ContextPlan) -> tuple[dict, list[int]]:
    """(the --metadata that scores ``tasks`` on the extension's ladder, the ladder). A length key the user set
    is kept: those are the documents the leakage check compared."""
    families = [f for f in map(length_family, tasks) if f]
    # one ladder for every line: room for the longest answer of any task printed
    room = max(LENGTH_KEYS[f][1] for f in [*families, *filter(None, map(length_family, LONG_TASKS))]) + CHAT_SLACK
    ladder = length_ladder(context.native, context.window, room)
    keys = {LENGTH_KEYS[f][0] for f in families}
    return {**{k: list(ladder) for k in sorted(keys)}, **eval_metadata}, ladder


def record_outputs(
    manifest: dict,
    cfg: Any,
    base: str,
    tasks: list[str],
    target: Path,
    merged: Path | None,
    *,
    window: int | None,
    seq_len: int,
    eval_max_tokens: int,
    on_gpu: bool,
    context: ContextPlan | None = None,
) -> None:
    """Output files, hashes and the lm_eval commands that score them, into the manifest and eval_command.sh.

    A merged or fully finetuned folder carries the new RoPE in its config.json; an adapter is served on the base
    model, so its command passes the RoPE as vLLM ``hf_overrides``."""
    out = Path(cfg.output_dir).expanduser().resolve()
    metadata, ladder = cfg.eval_metadata, []
    if context is not None and context.extends:
        metadata, ladder = extension_metadata(tasks, cfg.eval_metadata, context)
        lengths = [n for key, _ in LENGTH_KEYS.values() for n in metadata.get(key) or []]
        eval_max_tokens = max([eval_max_tokens, *ladder, *lengths])  # max_model_len covers the longest prompt
    max_len = eval_max_model_len(seq_len, eval_max_tokens, window)
    adapter = target if cfg.method == "lora" else None
    full = target if cfg.method == "full" else None
    overrides = context.hf_overrides() if context else None

    def command(output: str, on: list[str] = tasks, meta: dict = metadata, **kwargs: Any) -> tuple[list[str], dict]:
        argv = vllm_eval_command(base, on, meta, max_len, output_path=out / output, on_gpu=on_gpu, **kwargs)
        if cfg.system_prompt:  # every training example had this system turn (format_docs): lm-eval must render it too
            argv += ["--system_instruction", cfg.system_prompt]
        served = kwargs.get("merged") or base
        return argv, eval_env(served, max_len)

    argv, env = command("eval", adapter=adapter, merged=full, hf_overrides=None if full else overrides)
    manifest["outputs"] = {
        "dir": str(out),
        "adapter": str(adapter) if adapter else None,
        "model": str(full or merged) if (full or merged) else None,
        "files": {p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.suffix in {".safetensors", ".json"}},
    }
    if adapter:
        manifest["outputs"]["lora_rank"] = adapter_rank(adapter)
    manifest["eval_argv"] = argv
    manifest["eval_env"] = env
    manifest["eval_command"] = shell_command(argv, env)
    manifest["eval_max_model_len"] = max_len
    manifest["eval_metadata"] = metadata
    lines = [manifest["eval_command"]]
    if merged:
        manifest["eval_command_merged"] = shell_command(*command("eval_merged", merged=merged))
        lines.append("# or, the merged model (its config.json carries the RoPE):\n# " + manifest["eval_command_merged"])
    if overrides:
        free_argv, free_env = command("eval_training_free", hf_overrides=overrides)
        manifest["eval_argv_training_free"] = free_argv
        manifest["eval_command_training_free"] = shell_command(free_argv, free_env)
        lines.append(
            "# the training-free variant (the same RoPE on the untrained model):\n# "
            + shell_command(free_argv, free_env)
        )
    if ladder:
        manifest["eval_lengths"] = ladder
        manifest["eval_commands_long"] = {}
        served = {"merged": full} if full else {"adapter": adapter, "hf_overrides": overrides}
        for task in LONG_TASKS:
            meta = {LENGTH_KEYS[length_family(task)][0]: list(ladder)}
            line = shell_command(*command(f"eval_{task}", on=[task], meta=meta, **served))
            manifest["eval_commands_long"][task] = line
            lines.append(f"# {task} at the same lengths{' (its haystack is a download)' if task == 'niah' else ''}:")
            lines.append("# " + line)
    write_atomic(out / "eval_command.sh", "#!/bin/sh\n" + "\n".join(lines) + "\n")
