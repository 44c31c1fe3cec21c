"""What a finished finetune leaves for scoring: output files and hashes, and the ``lm_eval`` commands that score
the adapter, the merged or full model and, for a context extension, the untrained model with the same RoPE
(the training-free variant), each with exactly the RoPE and window the run trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness_ext.core.atomic_io import write_atomic
from harness_ext.data.dataset_cache import file_sha256
from harness_ext.finetune.context import ContextPlan
from harness_ext.finetune.manifest import eval_max_model_len
from harness_ext.plugin.runner import adapter_rank, eval_env, shell_command, vllm_eval_command


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
    max_len = eval_max_model_len(seq_len, eval_max_tokens, window)
    adapter = target if cfg.method == "lora" else None
    full = target if cfg.method == "full" else None
    overrides = context.hf_overrides() if context else None

    def command(output: str, **kwargs: Any) -> tuple[list[str], dict]:
        argv = vllm_eval_command(
            base, tasks, cfg.eval_metadata, max_len, output_path=out / output, on_gpu=on_gpu, **kwargs
        )
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
    write_atomic(out / "eval_command.sh", "#!/bin/sh\n" + "\n".join(lines) + "\n")
