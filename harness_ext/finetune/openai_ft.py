"""OpenAI finetuning: export the KV training data as chat-finetuning JSONL, then run a job.

Format (OpenAI chat finetuning): one JSON object per line, ``{"messages": [...]}`` with a system
message (the reference's, see PAPERS.md 1.1), the user prompt, and the assistant answer carrying
``"weight": 1``. Validation follows OpenAI's published rules (at least 10 examples; roles
system/user/assistant/tool; string content; an assistant message per example; weight 0 or 1 on
assistant messages only; examples within the model's token limit).

The job runs through the official ``openai`` client, so the base URL and key come from the usual
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (and ``OPENAI_ORG_ID`` / ``OPENAI_PROJECT_ID``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness_ext.core.atomic_io import write_json_atomic, write_jsonl_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import option
from harness_ext.finetune.rundir import MANIFEST, OutputLock, check_output_dir

SYSTEM_MESSAGE = "Write a response that appropriately completes the request."
MIN_EXAMPLES = 10
ROLES = {"system", "user", "assistant", "tool", "function"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
# Training-example context lengths from OpenAI's finetuning guide; unknown models get the smallest current one.
TOKEN_LIMITS = {
    "gpt-4o-mini-2024-07-18": 65536,
    "gpt-4o-2024-08-06": 65536,
    "gpt-4.1-2025-04-14": 65536,
    "gpt-4.1-mini-2025-04-14": 65536,
    "gpt-4.1-nano-2025-04-14": 65536,
    "gpt-3.5-turbo-0125": 16385,
    "gpt-3.5-turbo-1106": 16385,
    "gpt-3.5-turbo-0613": 4096,
}
DEFAULT_TOKEN_LIMIT = 16385
TERMINAL = {"succeeded", "failed", "cancelled"}
GROUP_OPENAI = "OpenAI backend (--backend openai)"


@dataclass
class OpenAIJobOptions:
    """The flags of ``needles finetune --backend openai`` (the job, not the data: that is FinetuneConfig)."""

    backend: str = option("hf", group=GROUP_OPENAI, choices=("hf", "openai"))
    openai_model: str = option("gpt-3.5-turbo-1106", "base model to finetune", group=GROUP_OPENAI)
    n_epochs: int | None = option(None, "OpenAI epochs (default: the API's auto)", group=GROUP_OPENAI, ge=1)
    suffix: str = option("needles-kv", group=GROUP_OPENAI)
    poll_interval: float = option(10.0, group=GROUP_OPENAI, gt=0)
    timeout: float = option(24 * 3600.0, "seconds to wait for the job", group=GROUP_OPENAI, gt=0)


# --------------------------------------------------------------------------- JSONL export
def openai_rows(docs: list[dict], system: str | None = SYSTEM_MESSAGE) -> list[dict]:
    """One chat-finetuning row per training document (system, user prompt, weighted assistant answer)."""
    rows = []
    for d in docs:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": d["prompt"]},
            {"role": "assistant", "content": d["target"], "weight": 1},
        ]
        rows.append({"messages": messages})
    return rows


def _token_counter():
    """(count(text), exact?): tiktoken when its encoding is available offline, else 1 token per byte,
    an upper bound for byte-level BPE tokenizers (every token covers at least one byte)."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("o200k_base")
        return (lambda text: len(enc.encode(text, disallowed_special=()))), True
    except Exception:  # noqa: BLE001 - no tiktoken or no cached encoding (no network): fall back
        return (lambda text: len(text.encode("utf-8"))), False


def example_tokens(row: dict, count: Any) -> int:
    """Tokens of one row as OpenAI bills them; ``count(text)`` counts a message's tokens."""
    # OpenAI's cookbook accounting: 3 tokens per message, 1 per name, 3 to prime the reply.
    n = 3
    for msg in row["messages"]:
        n += 3 + count(str(msg.get("content") or "")) + (1 if "name" in msg else 0)
    return n


def validate_rows(rows: list, max_tokens: int = DEFAULT_TOKEN_LIMIT) -> dict:
    """Check OpenAI's chat-finetuning format rules; raise one NeedlesError listing every problem."""
    errors: dict[str, list[int]] = {}

    def err(kind: str, i: int) -> None:
        errors.setdefault(kind, []).append(i)

    count, exact = _token_counter()
    lengths = []
    problems = []  # whole-file problems (the per-example ones go to `errors` with their indices)
    if len(rows) < MIN_EXAMPLES:
        problems.append(f"fewer than {MIN_EXAMPLES} examples: got {len(rows)} (OpenAI needs at least {MIN_EXAMPLES})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            err("example without a messages list", i)
            continue
        extra = set(row) - {"messages", "tools", "parallel_tool_calls", "functions"}
        if extra:
            err("unknown top-level key", i)
        for msg in row["messages"]:
            if not isinstance(msg, dict) or "role" not in msg:
                err("message without a role", i)
                continue
            if set(msg) - MESSAGE_KEYS:
                err("unknown message key", i)
            if msg["role"] not in ROLES:
                err("unrecognised role", i)
            content = msg.get("content")
            if (content is None and "tool_calls" not in msg and "function_call" not in msg) or (
                content is not None and not isinstance(content, str)
            ):
                err("missing or non-string content", i)
            if "weight" in msg and (msg["role"] != "assistant" or msg["weight"] not in (0, 1)):
                err("weight must be 0 or 1 and only on assistant messages", i)
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"]):
            err("example without an assistant message", i)
        n = example_tokens(row, count)
        lengths.append(n)
        if n > max_tokens:
            err(f"example over the {max_tokens}-token limit" + ("" if exact else " (bytes as upper bound)"), i)
    if errors or problems:
        lines = problems + [f"{kind}: {len(idx)} example(s) (first indices: {idx[:5]})" for kind, idx in errors.items()]
        fixes = (
            [f"raise --num-samples (documents per length) to give {MIN_EXAMPLES} or more examples"] if problems else []
        )
        fixes += ["fix the data parameters (shorter prompts, valid messages)"] if errors else []
        fix = "; ".join(fixes)
        raise NeedlesError("the OpenAI finetuning data is invalid:\n  " + "\n  ".join(lines), fix=fix)
    return {
        "examples": len(rows),
        "max_example_tokens": max(lengths),
        "total_tokens": sum(lengths),
        "token_count": "tiktoken o200k_base" if exact else "upper bound (UTF-8 bytes; tiktoken encoding unavailable)",
        "token_limit": max_tokens,
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as JSONL, written atomically."""
    write_jsonl_atomic(Path(path), rows)


def build_rows(cfg: Any, system: str | None = SYSTEM_MESSAGE) -> tuple[list[dict], list[dict], Any, Any]:
    """Training documents (same generator, leakage-checked), their OpenAI rows, the KVSpec and leakage report."""
    from harness_ext.finetune.config import validate_data
    from harness_ext.finetune.data import prepare_docs, train_spec
    from harness_ext.finetune.modeling import load_base

    validate_data(cfg.data)  # the data options, before the tokenizer is loaded
    if getattr(cfg, "loss_on", "answer") != "answer":  # the API trains on assistant turns only
        raise NeedlesError(
            f"loss_on={cfg.loss_on} is a loss of the local recipe: OpenAI finetuning trains on assistant turns only",
            fix="drop loss_on (or use loss_on: answer) with --backend openai, or train locally",
        )
    train_spec(cfg.data)
    base, _config, tokenizer = load_base(cfg)
    spec, tasks, docs, leak = prepare_docs(cfg, tokenizer, base)
    return docs, openai_rows(docs, cfg.system_prompt or system), spec, leak


def export_openai(
    cfg: Any, output: str | Path, openai_model: str = "gpt-3.5-turbo-1106", max_tokens: int | None = None
) -> dict:
    """Write the training data as OpenAI chat-finetuning JSONL (validated first); returns its statistics."""
    from harness_ext.core.output_files import check_output
    from harness_ext.finetune.data import docs_sha256

    if max_tokens is not None and max_tokens < 1:
        raise NeedlesError(f"max_tokens={max_tokens} must be at least 1", fix="drop --max-tokens to use the model's")
    check_output(output, "OpenAI JSONL file")  # before the data is generated
    docs, rows, spec, leak = build_rows(cfg)
    stats = validate_rows(rows, max_tokens or TOKEN_LIMITS.get(openai_model, DEFAULT_TOKEN_LIMIT))
    write_rows(Path(output), rows)
    return stats | {
        "output": str(output),
        "data_sha256": docs_sha256(docs),
        "spec": spec.to_json(),
        "eval_docs_checked": leak.eval_docs,
    }


# --------------------------------------------------------------------------- the job
def _client():
    try:
        import openai
    except ImportError:
        raise NeedlesError("the OpenAI backend needs the openai package", fix="pip install openai") from None
    try:
        return openai.OpenAI(), openai
    except openai.OpenAIError as exc:
        raise NeedlesError(
            f"cannot create the OpenAI client: {exc}",
            fix="export OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible server)",
        ) from None


def _api_call(openai, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except openai.APIStatusError as exc:
        raise NeedlesError(
            f"OpenAI {what} failed (HTTP {exc.status_code}): {exc.message}",
            fix="check OPENAI_API_KEY / OPENAI_BASE_URL and the request",
        ) from None
    except openai.APIConnectionError as exc:
        raise NeedlesError(f"OpenAI {what}: cannot reach the API ({exc})", fix="check OPENAI_BASE_URL") from None


def run_job(
    path: Path,
    openai_model: str,
    n_epochs: int | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    poll_interval: float = 10.0,
    timeout: float = 24 * 3600.0,
    progress: bool = True,
) -> dict:
    """Upload ``path``, create the job, poll it with progress; returns the finished job as a dict."""
    from tqdm.auto import tqdm

    client, openai = _client()
    with open(path, "rb") as f:
        uploaded = _api_call(openai, "file upload", client.files.create, file=f, purpose="fine-tune")
    hyper = {"n_epochs": n_epochs} if n_epochs else {}
    create = {
        "training_file": uploaded.id,
        "model": openai_model,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }
    if suffix:
        create["suffix"] = suffix
    if seed is not None:
        create["seed"] = seed
    job = _api_call(openai, "job creation", client.fine_tuning.jobs.create, **create)
    print(
        f"[needles finetune] OpenAI job {job.id} created (file {uploaded.id}, model {openai_model})",
        file=sys.stderr,
        flush=True,
    )
    bar = tqdm(total=None, desc=f"openai {job.id}", unit="step", disable=not progress, file=sys.stderr)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        job = _api_call(openai, "job status", client.fine_tuning.jobs.retrieve, job.id)
        events = _api_call(openai, "job events", client.fine_tuning.jobs.list_events, job.id, limit=100)
        for ev in reversed(list(events.data)):  # the API lists newest first
            if ev.id in seen:
                continue
            seen.add(ev.id)
            data = ev.data or {}
            if isinstance(data, dict) and "step" in data:
                bar.total = data.get("total_steps") or bar.total
                bar.n = int(data["step"])
                loss = data.get("train_loss")
                bar.set_postfix(loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else loss, status=job.status)
                bar.refresh()
            else:
                bar.write(f"[openai] {ev.message}", file=sys.stderr)
        bar.set_postfix_str(f"status={job.status}")
        if job.status in TERMINAL:
            break
        if time.monotonic() > deadline:
            bar.close()
            raise NeedlesError(
                f"OpenAI job {job.id} still {job.status} after {timeout:.0f}s",
                fix=f"check it later: the job keeps running (id {job.id})",
            )
        time.sleep(poll_interval)
    bar.close()
    if job.status != "succeeded":
        msg = getattr(job.error, "message", None) if job.error else None
        raise NeedlesError(
            f"OpenAI job {job.id} {job.status}" + (f": {msg}" if msg else ""),
            fix="read the job's events; fix the data or hyperparameters and rerun",
        )
    return job.model_dump() | {"training_file": uploaded.id}


def base_tokenizer(cfg: Any) -> str:
    """The tokenizer (model folder or hub id) that sized the training prompts."""
    from harness_ext.finetune.modeling import resolve_model

    return resolve_model(cfg.model)


def _eval_command(model: str, tasks: list[str], cfg: Any, tokenizer: str) -> str:
    """Scores the finetuned OpenAI model on the same tasks; prompts are sized with the tokenizer
    that sized the training data, and the system message matches the training examples."""
    import shlex

    metadata = {**cfg.eval_metadata, "tokenizer": tokenizer}
    return shlex.join(
        [
            "lm_eval",
            "run",
            "--model",
            "openai-chat-completions",
            "--model_args",
            f"model={model}",
            "--tasks",
            ",".join(tasks),
            "--apply_chat_template",
            "--system_instruction",
            cfg.system_prompt or SYSTEM_MESSAGE,
            "--metadata",
            json.dumps(metadata),
            "--log_samples",
            "--output_path",
            str(Path(cfg.output_dir) / "eval"),
        ]
    )


def finetune_openai(
    cfg: Any,
    openai_model: str = "gpt-3.5-turbo-1106",
    n_epochs: int | None = None,
    suffix: str | None = "needles-kv",
    poll_interval: float = 10.0,
    timeout: float = 24 * 3600.0,
) -> dict:
    """Export + validate the data, run the OpenAI job, write a manifest; returns it."""
    from harness_ext.finetune.data import docs_sha256
    from harness_ext.finetune.manifest import versions

    out = Path(cfg.output_dir).expanduser().resolve()
    with OutputLock(out):
        check_output_dir(out, resume=False)  # a job cannot be resumed: a finished job's folder is not reused
        docs, rows, spec, leak = build_rows(cfg)
        stats = validate_rows(rows, TOKEN_LIMITS.get(openai_model, DEFAULT_TOKEN_LIMIT))
        path = out / "openai_train.jsonl"
        write_rows(path, rows)
        job = run_job(
            path,
            openai_model,
            n_epochs=n_epochs,
            suffix=suffix,
            seed=cfg.seed,
            poll_interval=poll_interval,
            timeout=timeout,
        )
        manifest = {
            "kind": "needles-finetune-openai",
            "base_model": openai_model,
            "fine_tuned_model": job["fine_tuned_model"],
            "job_id": job["id"],
            "training_file": job["training_file"],
            "trained_tokens": job.get("trained_tokens"),
            "data": {"spec": spec.to_json(), "documents": len(docs), "data_sha256": docs_sha256(docs), **stats},
            "leakage_check": {"tasks": leak.tasks, "eval_docs": leak.eval_docs, "overlap": leak.overlap},
            "eval_command": _eval_command(job["fine_tuned_model"], leak.tasks, cfg, base_tokenizer(cfg)),
            "versions": versions(),
        }
        write_json_atomic(out / MANIFEST, manifest)
    print(f"[needles finetune] OpenAI model: {job['fine_tuned_model']}", file=sys.stderr)
    return manifest
