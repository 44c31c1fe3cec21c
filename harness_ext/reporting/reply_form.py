"""What a run's replies look like, read from an lm-eval sample log (``samples_<task>_<ts>.jsonl``): how long they
are, how many contain a gold answer anywhere, how many the metric credited, how many are empty.

A finetune that lowers ``best_subspan_em`` may have stopped knowing the answer, or may still give it in a form the
metric does not credit: after a first line (the metric reads the first line only), or after the task's stop string
cut the reply short (MDQA stops at the first newline, so a reply that opens with a newline is empty). The gap between
"gold answer anywhere" and "credited" measures the second; the empty share and the length measure the form.
"""

from __future__ import annotations

from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.results_io import as_number, iter_samples
from harness_ext.tasklib.metrics import squad_normalize


def reply_text(row: dict) -> str:
    """The model's reply of one sample row: the raw response (before any filter), else the filtered one."""
    for key in ("resps", "filtered_resps"):
        value = row.get(key)
        while isinstance(value, list) and value:  # resps: one list per request; filtered_resps: one item each
            value = value[0]
        if isinstance(value, str):
            return value
    return ""


def gold_answers(row: dict) -> list[str]:
    """The gold answers of one sample row: the document's ``answers`` (MDQA), else the logged target."""
    doc = row.get("doc")
    value = doc.get("answers") if isinstance(doc, dict) and doc.get("answers") is not None else row.get("target")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str)]


def contains_gold(reply: str, answers: list[str]) -> bool:
    """A normalised gold answer is a substring of the normalised *whole* reply (every line): the test of
    ``best_subspan_em`` without its restriction to the first line."""
    text = squad_normalize(reply)
    return any(a and a in text for a in (squad_normalize(x) for x in answers))


def reply_form(path: str | Path, metric: str = "best_subspan_em", filter: str = "none") -> dict:
    """Per sample log: ``n``, mean reply length in words (whitespace-split) and characters, and the shares of
    replies that contain a gold answer anywhere, that the metric credited (its logged value, > 0), and that are
    empty (whitespace only); ``answer_not_credited`` is the share containing an answer the metric did not credit."""
    n = words = chars = anywhere = credited = empty = missed = 0
    for row in iter_samples(Path(path)):
        if row.get("filter", "none") != filter:
            continue
        answers = gold_answers(row)
        if not answers:
            raise NeedlesError(
                f"{path}: sample {row['doc_id']} has no gold answer (neither doc.answers nor a string target)",
                fix="read the sample log of a QA task with text answers (MDQA: samples_mdqa_*.jsonl)",
            )
        value = as_number(row.get(metric))
        if value is None:
            raise NeedlesError(
                f"{path}: sample {row['doc_id']} has no {metric} value",
                fix=f"pass the metric the task logs per sample (metric=...), not {metric!r}",
            )
        reply = reply_text(row)
        found, hit = contains_gold(reply, answers), value > 0
        n += 1
        words += len(reply.split())
        chars += len(reply)
        anywhere += found
        credited += hit
        empty += not reply.strip()
        missed += found and not hit
    if n == 0:
        raise NeedlesError(f"{path}: no samples with filter {filter!r}", fix="pass the filter the task logs")

    def share(count: int) -> float:
        return round(count / n, 6)

    return {
        "n": n,
        "mean_words": round(words / n, 3),
        "mean_chars": round(chars / n, 3),
        "contains_answer": share(anywhere),
        "credited": share(credited),
        "answer_not_credited": share(missed),
        "empty": share(empty),
    }


def markdown(forms: dict[str, dict[str, dict]]) -> list[str]:
    """A "Reply form" table, one row per run and task ({run: {task: reply_form}}); nothing when there is none."""
    if not forms:
        return []
    lines = [
        "## Reply form",
        "",
        "Per run, from its sample logs: mean reply length, the share of replies that contain a gold answer anywhere "
        "(SQuAD-normalised, every line), the share the metric credited, the share holding an answer it did not "
        "credit, and empty replies.",
        "",
        "| run | task | n | mean words | mean chars | gold answer anywhere | credited | answer not credited | empty |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, tasks in forms.items():
        for task, f in tasks.items():
            lines.append(
                f"| {run} | {task} | {f['n']} | {f['mean_words']:.1f} | {f['mean_chars']:.1f} | "
                f"{f['contains_answer']:.3f} | {f['credited']:.3f} | {f['answer_not_credited']:.3f} | {f['empty']:.3f} |"
            )
    return [*lines, ""]
