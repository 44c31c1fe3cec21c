"""What ``needles scorecard MODEL`` runs: the curated long-context suite, sized by a budget, at lengths up to the
window the model is served with.

The suite is a few lm_eval runs, one per family, each resumable on its own (``harness_ext.workflow.steps``):

- ``kv``: synthetic KV retrieval, simple and multi-key (``kv_retrieval_simple``, ``kv_retrieval_multisubkey``),
  length x depth: no download;
- ``niah``: Wu et al.'s natural-language needle in book text (``niah_single``), length x depth; the haystack is a
  download (or a mirror);
- ``passkey``: Mohtashami & Jaggi's 5-digit pass key in repeated filler (``needles_passkey``), length x depth: no
  download, so it runs in every budget;
- ``mdqa``: the MDQA shape of Lost in the Middle on real NQ-Open questions (``synth_mdqa_real``: a real question,
  its gold passage and answer-free passages of other questions) at gold positions 1 ... 20: the position curve,
  shown beside the paper's ``mdqa20`` numbers; reads the NQ-Open oracle file;
- ``synth``: the MDQA-shaped synthetic cells along the length ladder (``full`` budget only);
- ``flenqa``: FLenQA (direct answers, book padding) at its context sizes up to the window; a download;
- ``long_ppl``: the loss of a C-token continuation after P tokens of held-out book text (``needles_long_ppl``), P on
  the ladder up to the window less C (and at most ``LONG_PPL_MAX_CONTEXT``): log-likelihoods, so its own lm_eval
  call without ``--apply_chat_template`` (the task refuses it), and not through a chat endpoint; the book part is
  a download (or the NIAH mirror). A loss curve, lower is better: never an effective length.

A family whose data cannot be had (no network, no mirror, no cache) is left out with the reason, as
``needles experiment`` leaves out its ``optional`` tasks. lm-eval's ``ruler`` downloads its corpora from the
Hugging Face hub inside lm_eval at run time, which cannot be checked beforehand; it is not in the suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness_ext.core.errors import NeedlesError

if TYPE_CHECKING:
    from harness_ext.scorecard.endpoint import Endpoint

# tokens kept free at the top of the window: the chat template and the longest answer (KV 64, NIAH 50 tokens)
TOP_RESERVE = 256
LADDER_START = 256
FLENQA_SIZES = (250, 500, 1000, 2000, 3000)
KV_SEED = 1000
MDQA_TOKENS_PER_DOC = 160  # a real NQ-Open passage with its title, a little above the mean (for the doc count)
LONG_PPL_CONTINUATION = 128  # C: scored tokens per document (the task's default)
# The held-out book part is ~34K SmolLM2 tokens (129K characters; ~28K in a 256K-vocabulary tokenizer): the longest
# context must leave room for every document's continuation after it, in any tokenizer.
LONG_PPL_MAX_CONTEXT = 16384


@dataclass(frozen=True)
class Budget:
    """Samples per cell of each family; ``lengths`` "ladder" (256 ... the window) or a fixed list (a smoke test)."""

    name: str
    lengths: tuple[int, ...] | str
    kv_samples: int
    kv_depths: tuple[float, ...]
    multikey: bool
    niah_samples: int
    niah_depths: tuple[float, ...]
    mdqa_samples: int
    mdqa_positions: tuple[int, ...]  # of 20 documents (scaled down when fewer fit)
    mdqa_documents: int  # 20, as Lost in the Middle's main setting; fewer when the window is short
    synth_samples: int  # 0: no synth length sweep
    flenqa_limit: int  # lm_eval --limit of the FLenQA run (rows per task, sizes interleaved)
    what: str
    passkey_samples: int
    passkey_depths: tuple[float, ...]
    long_ppl_docs: int  # documents, each scored after every context length


BUDGETS = {
    "tiny": Budget("tiny", (256, 512), 1, (0.0, 1.0), True, 1, (0.0, 1.0), 1, (1, 5), 5, 0, 5,
                   "a smoke test: lengths 256 and 512 only, one sample per cell",
                   passkey_samples=1, passkey_depths=(0.0, 1.0), long_ppl_docs=1),
    "small": Budget("small", "ladder", 1, (0.0, 1.0), False, 1, (0.5,), 2, (1, 20), 20, 0, 5,
                    "the ladder with one KV sample at depths 0 and 1, one NIAH and one passkey sample, 2 MDQA "
                    "questions, 2 loss documents",
                    passkey_samples=1, passkey_depths=(0.5,), long_ppl_docs=2),
    "default": Budget("default", "ladder", 1, (0.0, 0.5, 1.0), False, 1, (0.0, 1.0), 2, (1, 10, 20), 20, 0, 10,
                      "the ladder; KV simple 1 sample x 3 depths, NIAH and passkey 1 x 2 depths per length; 2 MDQA "
                      "questions at gold positions 1/10/20 of 20 documents; FLenQA 10 rows per task; 4 loss documents",
                      passkey_samples=1, passkey_depths=(0.0, 1.0), long_ppl_docs=4),
    "full": Budget("full", "ladder", 10, (0.0, 0.25, 0.5, 0.75, 1.0), True, 6, (0.0, 0.25, 0.5, 0.75, 1.0), 50,
                   (1, 5, 10, 15, 20), 20, 10, 0,
                   "the ladder; KV 10 samples x 5 depths, NIAH 6 x 5, passkey 6 x 5, 50 MDQA questions at 5 positions, "
                   "the synthetic MDQA cells at every length, all of FLenQA up to the window, 16 loss documents",
                   passkey_samples=6, passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), long_ppl_docs=16),
}  # fmt: skip


@dataclass
class FamilyRun:
    """One lm_eval run of the scorecard."""

    family: str
    tasks: list[str]
    metadata: dict
    limit: int | None = None
    what: str = ""
    documents: int | None = None  # prompts it will score, where known before the run
    prompt_tokens: int | None = None
    chat_template: bool = True  # False: plain prompts (a loss after exactly P tokens of text)


@dataclass
class ScorecardPlan:
    model: str  # what the user gave
    served: str  # the folder or hub id vLLM loads
    window: int
    window_source: str
    budget: Budget
    lengths: list[int]
    runs: list[FamilyRun] = field(default_factory=list)
    name: str = ""  # how the page names the model: --name, else the folder's (or hub id's) last part
    endpoint: Endpoint | None = None  # an OpenAI-compatible server instead of vLLM (served: the model's name there)


def served_window(served: str, max_model_len: int | None) -> tuple[int, str]:
    """(window, where it comes from): the config's RoPE window (capped by the tokenizer's model_max_length, as vLLM
    caps it), or ``--max-model-len`` when given (it may only shrink the window: past it the guard refuses)."""
    from harness_ext.core.rope import read_config_json, rope_window, tokenizer_max_length

    config = read_config_json(served)
    window = rope_window(config) if config else None
    source = "the model's config.json"
    cap = tokenizer_max_length(served)
    if window and cap and cap < window:
        window, source = cap, "the tokenizer's model_max_length"
    if max_model_len is not None:
        if max_model_len < 512:
            raise NeedlesError(f"--max-model-len {max_model_len} is too short for a scorecard", fix="use 512 or more")
        if window and max_model_len > window:
            raise NeedlesError(
                f"--max-model-len {max_model_len} is past the model's window {window} ({source})",
                fix="extend the context first (needles finetune --context-length ...; docs/extension.md), or pass a "
                "smaller --max-model-len",
            )
        return max_model_len, "--max-model-len"
    if not window:
        raise NeedlesError(
            f"cannot read the context window of {served} (no config.json locally)",
            fix="pass --max-model-len N (the window to serve and score it at)",
        )
    return window, source


def endpoint_window(endpoint: Endpoint, max_model_len: int | None) -> tuple[int, str]:
    """(window, where it comes from) for an endpoint: ``--max-model-len``, else vLLM's rule on the tokenizer's folder
    (``served_window``: its config.json capped by model_max_length), else the tokenizer's model_max_length alone (a
    tokenizer-only folder has no config.json). Never guessed: none of them is exit 2."""
    from harness_ext.core.rope import read_config_json, tokenizer_max_length

    if max_model_len is None and read_config_json(endpoint.tokenizer) is None:
        cap = tokenizer_max_length(endpoint.tokenizer)
        if not cap:
            raise NeedlesError(
                f"cannot read the served window: the tokenizer {endpoint.tokenizer} has no config.json and no "
                "model_max_length",
                fix="pass --max-model-len N: the window the endpoint serves (vLLM: its --max-model-len)",
            )
        window, source = cap, "the tokenizer's model_max_length"
    else:
        window, source = served_window(endpoint.tokenizer, max_model_len)
    return window, source if source == "--max-model-len" else f"{source} in the tokenizer folder {endpoint.tokenizer}"


def ladder(window: int, start: int = LADDER_START, reserve: int = TOP_RESERVE) -> list[int]:
    """Powers of two from ``start`` below the top, then the top itself (the window less ``reserve``)."""
    top = window - reserve
    out, length = [], start
    while length < top:
        out.append(length)
        length *= 2
    return [*out, top]


def check_lengths(lengths: list[int], window: int) -> list[int]:
    bad = [x for x in lengths if x < 128 or x > window - TOP_RESERVE]
    if bad:
        raise NeedlesError(
            f"--lengths {bad} are outside 128 .. {window - TOP_RESERVE} (the window {window} less {TOP_RESERVE} "
            "tokens for the chat template and the answer)",
            fix="choose lengths inside that range, or serve a longer window",
        )
    return sorted(set(lengths))


def make_plan(
    model: str,
    served: str,
    budget: str,
    max_model_len: int | None = None,
    lengths: list[int] | None = None,
    name: str | None = None,
    endpoint: Endpoint | None = None,
) -> ScorecardPlan:
    """The runs of the scorecard (every option checked; nothing loaded but the model's config). With ``endpoint``
    the window comes from its tokenizer (``endpoint_window``) and only chat-completion tasks run."""
    if budget not in BUDGETS:
        raise NeedlesError(f"--budget {budget!r} is not a budget", fix=f"choose one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    if endpoint is not None:
        window, source = endpoint_window(endpoint, max_model_len)
    else:
        window, source = served_window(served, max_model_len)
    if lengths:
        grid = check_lengths(list(lengths), window)
    elif b.lengths == "ladder":
        grid = ladder(window)
    else:
        grid = check_lengths([x for x in b.lengths if x <= window - TOP_RESERVE] or [window - TOP_RESERVE], window)
    plan = ScorecardPlan(model, served, window, source, b, grid, name=name or Path(served.rstrip("/")).name,
                         endpoint=endpoint)  # fmt: skip
    kv_tasks = ["kv_retrieval_simple"] + (["kv_retrieval_multisubkey"] if b.multikey else [])
    # seed 1000: the finetuning recipes train on seed-0 documents and hold out seed 1000 (no document is both)
    kv_meta = {"lengths": grid, "depths": list(b.kv_depths), "num_samples": b.kv_samples, "seed": KV_SEED}
    kind = "simple and multi-key" if b.multikey else "simple"
    plan.runs.append(FamilyRun("kv", kv_tasks, kv_meta, what=f"KV retrieval ({kind}), length x depth"))
    niah_meta = {"niah_lengths": grid, "niah_depths": list(b.niah_depths), "niah_num_samples": b.niah_samples}
    plan.runs.append(FamilyRun("niah", ["niah_single"], niah_meta, what="needle in a haystack, length x depth"))
    passkey_meta = {"passkey_lengths": grid, "passkey_depths": list(b.passkey_depths),
                    "passkey_num_samples": b.passkey_samples}  # fmt: skip
    plan.runs.append(FamilyRun("passkey", ["needles_passkey"], passkey_meta,
                               what="passkey in filler text, length x depth"))  # fmt: skip
    docs = b.mdqa_documents if b.mdqa_documents * MDQA_TOKENS_PER_DOC + TOP_RESERVE <= window else 10
    positions = sorted({min(p, docs) for p in b.mdqa_positions})
    mdqa_meta = {"synth_num_documents": docs, "synth_positions": positions, "synth_num_samples": b.mdqa_samples}
    plan.runs.append(FamilyRun("mdqa", ["synth_mdqa_real"], mdqa_meta,
                               what=f"MDQA on real NQ-Open questions, {docs} documents, gold position curve"))  # fmt: skip
    if b.synth_samples:
        cells = ["synth_mdqa_symbolic_kv", "synth_mdqa_templated_entities"]
        synth_meta = {"synth_lengths": [x for x in grid if x >= 512] or grid[-1:], "synth_positions": [1],
                      "synth_num_samples": b.synth_samples}  # fmt: skip
        plan.runs.append(FamilyRun("synth", cells, synth_meta, what="MDQA-shaped synthetic cells by length"))
    sizes = [s for s in FLENQA_SIZES if s <= window - TOP_RESERVE - 300]  # FLenQA's sizes are approximate
    if sizes:
        flen_meta = {"flenqa_ctx_sizes": sizes, "flenqa_padding_types": ["books"]}
        plan.runs.append(FamilyRun("flenqa", ["flenqa"], flen_meta, limit=b.flenqa_limit or None,
                                   what="FLenQA (direct answers, book padding) by context size"))  # fmt: skip
    if endpoint is None:  # chat completions return no prompt log-probabilities
        contexts = long_ppl_contexts(grid, window, lengths is None and b.lengths == "ladder")
        ppl_meta = {"long_ppl_contexts": contexts, "long_ppl_continuation": LONG_PPL_CONTINUATION,
                    "long_ppl_num_docs": b.long_ppl_docs}  # fmt: skip
        plan.runs.append(FamilyRun("long_ppl", ["needles_long_ppl"], ppl_meta, chat_template=False,
                                   what=f"loss of a {LONG_PPL_CONTINUATION}-token continuation of held-out book text "
                                   "by the context length before it"))  # fmt: skip
    for run in plan.runs:
        run.documents, run.prompt_tokens = _cost(run, docs)
    if endpoint is not None:
        from harness_ext.scorecard.endpoint import check_generation_tasks

        check_generation_tasks([t for run in plan.runs for t in run.tasks])
    return plan


def long_ppl_contexts(grid: list[int], window: int, on_ladder: bool) -> list[int]:
    """The context lengths P of the loss family: the ladder up to the window less the continuation (no chat template
    and no generation take room), capped where the held-out book holds every document; with fixed lengths, those
    lengths (the top where none fits)."""
    top = min(window - LONG_PPL_CONTINUATION, LONG_PPL_MAX_CONTEXT)
    if on_ladder:
        return ladder(top + LONG_PPL_CONTINUATION, reserve=LONG_PPL_CONTINUATION)
    return [x for x in grid if x <= top] or [top]


def _cost(run: FamilyRun, mdqa_docs: int) -> tuple[int | None, int | None]:
    """(prompts, prompt tokens) of a family run, from its metadata (the experiment's estimator where it knows the
    family; FLenQA's rows are read at run time)."""
    from harness_ext.workflow.cost import eval_rows

    m = run.metadata
    if run.family == "mdqa":
        n = m["synth_num_samples"] * len(m["synth_positions"])
        return n, n * mdqa_docs * MDQA_TOKENS_PER_DOC
    if run.family == "synth":
        n = m["synth_num_samples"] * len(m["synth_positions"]) * len(m["synth_lengths"]) * len(run.tasks)
        return n, m["synth_num_samples"] * len(m["synth_positions"]) * sum(m["synth_lengths"]) * len(run.tasks)
    if run.family == "flenqa":
        return None, None
    if run.family == "passkey":
        per_length = m["passkey_num_samples"] * len(m["passkey_depths"])
        return per_length * len(m["passkey_lengths"]), per_length * sum(m["passkey_lengths"])
    if run.family == "long_ppl":
        n = m["long_ppl_num_docs"]
        return n * len(m["long_ppl_contexts"]), n * sum(p + m["long_ppl_continuation"] for p in m["long_ppl_contexts"])
    rows, _ = eval_rows(run.tasks, m, run.limit)
    return sum(r["documents"] for r in rows), sum(r["prompt_tokens"] for r in rows)


def format_cost(plan: ScorecardPlan, seconds_per_kilotoken: float | None = None) -> str:
    """The cost estimate printed before anything runs."""
    via = "--model vllm" if plan.endpoint is None else f"--model local-chat-completions at {plan.endpoint.base_url}"
    lines = [
        f"[needles scorecard] {plan.model}: window {plan.window} tokens ({plan.window_source}); budget "
        f"{plan.budget.name} ({plan.budget.what}); lengths {', '.join(map(str, plan.lengths))}",
        f"[needles scorecard] cost estimate (one lm_eval {via} run per family):",
    ]
    total = 0
    for run in plan.runs:
        if run.documents is None:
            size = "prompts read at run time" + (f" (--limit {run.limit} per task)" if run.limit else "")
        else:
            size = f"{run.documents:,} prompts, ~{run.prompt_tokens:,} prompt tokens"
            if not run.chat_template:
                size += " (log-likelihoods, no chat template)"
            total += run.prompt_tokens or 0
        lines.append(f"  {run.family}: {', '.join(run.tasks)}: {size}")
    if plan.endpoint is not None:
        lines.append("  long_ppl: not planned (a chat endpoint returns no prompt log-probabilities)")
    line = f"  total ~{total:,} prompt tokens" + (" (plus one engine start per family run)" if plan.endpoint is None
                                                  else ", one request per prompt")  # fmt: skip
    if seconds_per_kilotoken:
        line += f"; at {seconds_per_kilotoken:g} s per 1,000 tokens ~{total * seconds_per_kilotoken / 60000:.0f} min"
    lines.append(line)
    return "\n".join(lines)
