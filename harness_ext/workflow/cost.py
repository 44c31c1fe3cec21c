"""What an experiment will cost, printed before it starts: training tokens, prompt and generated tokens.

Counted from the config alone (no model or data loaded): training tokens from the finetune data spec,
prompt tokens of the synthetic families from their length targets; the prompts of data read at run time
(MDQA, FLenQA, lm-eval's general tasks) are listed as not estimated rather than guessed.
"""

from __future__ import annotations

from harness_ext.workflow.suite import ExperimentConfig

# (metadata key of the lengths, of the sample count, of the depths, default lengths/samples/depth count, max new tokens)
_FAMILIES = {
    "kv_retrieval": ("lengths", "num_samples", "depths", (1024, 3072), 10, 5, 64),
    "niah": ("niah_lengths", "niah_num_samples", "niah_depths", (1024, 2048), 6, 5, 50),
    # prompts at most their length target (exact fit), once per placement
    "musique": ("musique_lengths", "musique_num_questions", "musique_placements", (2048, 4096), 100, 3, 32),
    "summhay": ("summhay_lengths", "summhay_num_insights", "summhay_placements", (4096, 8192), 60, 3, 32),
    "needles_passkey": ("passkey_lengths", "passkey_num_samples", "passkey_depths", (1024, 2048), 6, 5, 16),
    # one loglikelihood request per (document, context length): the context plus its scored continuation
    # (long_ppl_continuation tokens, counted with the prompt), nothing generated
    "needles_long_ppl": ("long_ppl_contexts", "long_ppl_num_docs", None, (512, 1024, 2048, 4096), 16, 1, 0),
}
_GROUP_TASKS = {"kv_retrieval": 3, "niah": 1, "musique": 1, "summhay": 1, "needles_passkey": 1, "needles_long_ppl": 1}


def _family(task: str) -> str | None:
    for family in _FAMILIES:
        if task == family or task.startswith(family + "_"):
            return family
    return None


def _training_documents(ft) -> tuple[int, list[int] | None]:
    """(documents per epoch, their token lengths or None) of the finetune's data spec, defaults included."""
    from harness_ext.finetune.data import train_spec

    spec = train_spec(ft.data)
    grid = getattr(spec, "grid", None)
    if grid is not None:  # passkey: every sample at every length and depth, each exactly its length target
        return spec.documents(), list(grid.lengths) * len(grid.depths)
    synth = getattr(spec, "synth", None)
    if synth is None:  # KV: num_samples documents per length target, each rendered once per depth
        if spec.lengths is None:  # sized by num_dicts: not guessed
            return spec.num_samples * len(spec.depths or (None,)), None
        lengths = list(spec.lengths)
        return spec.num_samples * len(lengths) * len(spec.depths or (None,)), lengths
    # a synth_mdqa sample is rendered at every gold position (musique, summhay: placement) and length target
    n = synth.num_samples * len(getattr(synth, "placements", None) or synth.positions) * len(synth.lengths or (None,))
    return n, list(synth.lengths) if synth.lengths else None


def cells_per_sample(task: str, metadata: dict) -> int | None:
    """Documents one sample index renders of a synthetic task (lengths x depths or placements, per leaf task),
    None for tasks whose data is read at run time. Their documents are ordered (sample, length, depth), so lm-eval's
    ``--limit`` k x cells scores k documents in every cell."""
    family = _family(task)
    if family is not None:
        len_key, _, d_key, d_lengths, _, d_depths, _ = _FAMILIES[family]
        lens = metadata.get(len_key) or d_lengths
        depths = metadata.get(d_key, [0] * d_depths) if d_key else None
    elif task.startswith("synth_mdqa"):
        lens, depths = metadata.get("synth_lengths") or [None], metadata.get("synth_positions", [1, 5, 10])
    else:
        return None
    n_lengths = 1 if isinstance(lens, int) else len(lens)
    return n_lengths * (len(depths) if isinstance(depths, list) and depths else 1)


def eval_rows(tasks: list[str], metadata: dict, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """([{task, documents, prompt_tokens, max_generated_tokens}], tasks not estimated) of one evaluation
    (also ``needles scorecard``'s estimate)."""
    rows, unknown = [], []
    for task in tasks:
        family = _family(task)
        if family is None:
            unknown.append(task)
            continue
        len_key, n_key, d_key, d_lengths, d_n, d_depths, max_new = _FAMILIES[family]
        lens = metadata.get(len_key) or d_lengths
        lens = [lens] if isinstance(lens, int) else list(lens)
        n = int(metadata.get(n_key, d_n))
        depths = metadata.get(d_key, [0] * d_depths) if d_key else None
        n_depths = 1 if depths is None else len(depths) if isinstance(depths, list) else 1
        subtasks = _GROUP_TASKS[family] if task == family else 1
        docs = n * len(lens) * n_depths * subtasks
        if limit:
            docs = min(docs, limit * subtasks)
        scored = int(metadata.get("long_ppl_continuation", 128)) if family == "needles_long_ppl" else 0
        prompt = int(docs * (sum(lens) / len(lens) + scored))
        rows.append({"task": task, "documents": docs, "prompt_tokens": prompt, "max_generated_tokens": docs * max_new})
    return rows, unknown


def estimate(cfg: ExperimentConfig, ft) -> dict:
    """{"training_tokens", "eval": [{task, documents, prompt_tokens, max_generated_tokens}], "not_estimated": [...]}.

    ``ft`` is the experiment's resolved FinetuneConfig (its recipe and overrides applied).
    """
    samples, lengths = _training_documents(ft)
    steps = optimizer_steps(ft, samples)
    epochs = float(ft.epochs)
    if ft.max_steps:  # a step budget: batch x accumulation x steps examples, at most the epochs'
        epochs = min(epochs, ft.max_steps * ft.batch_size * ft.grad_accum / max(samples, 1))
    # without length targets a synth_mdqa document is as long as its passages: not guessed
    training = int(samples * (sum(lengths) / len(lengths)) * epochs) if lengths else None
    rows, unknown = eval_rows(cfg.tasks, cfg.metadata, cfg.limit)
    return {
        "training_tokens": training,
        "training_rows": samples,
        "optimizer_steps": steps,
        "epochs": epochs,
        "eval": rows,
        "not_estimated": unknown,
    }


def optimizer_steps(ft, rows: int) -> int | None:
    """The optimizer steps ``needles finetune`` will take on one process (the recipe's own plan, on ``rows``
    examples); None when packed batching makes them depend on the examples' lengths."""
    from harness_ext.finetune.batches import plan_run

    if ft.batching == "packed":
        return None
    return plan_run(ft, [1] * rows, 1)[1]


def training_text(est: dict) -> str:
    """The training part of a cost estimate: tokens where the data spec sizes its rows, else rows; the steps."""
    tokens, steps = est["training_tokens"], est.get("optimizer_steps")
    size = (
        f"~{tokens:,} tokens"
        if tokens is not None
        else f"{est['training_rows']:,} rows (tokens counted once generated)"
    )
    return f"{size}, {est['epochs']:g} epochs" + (
        f", {steps:,} optimizer steps on one process" if steps is not None else ""
    )


def eval_cost_line(row: dict, unit: str = "documents") -> str:
    """One task's evaluation cost: its ``unit`` (documents or prompts), prompt tokens and the generation bound."""
    return (
        f"{row['task']}: {row['documents']:,} {unit}, ~{row['prompt_tokens']:,} prompt tokens, "
        f"<= {row['max_generated_tokens']:,} generated tokens"
    )


def format_estimate(est: dict) -> str:
    lines = [f"[needles experiment] cost estimate: training {training_text(est)}"]
    for r in est["eval"]:
        lines.append(f"  {eval_cost_line(r)}, per evaluation (x2: base and finetuned)")
    if est["not_estimated"]:
        lines.append(f"  not estimated (their data is read at run time): {', '.join(est['not_estimated'])}")
    return "\n".join(lines)
