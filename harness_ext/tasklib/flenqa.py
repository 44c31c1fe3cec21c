"""lm-eval glue for FLenQA (Same Task, More Tokens): data, the reference prompts, scoring, breakdowns.

Data: the parquet file of ``alonj/FLenQA`` (split ``eval``) at a pinned revision, through
harness_ext.data.sources (download + cache, or the ``flenqa_mirror`` / ``NEEDLES_FLENQA_MIRROR``
folder). Row order: within each ``ctx_size`` the rows are sorted by SHA-256 of
``"<flenqa_order_seed>\\0<global_sample_id>"`` and the sizes are interleaved, so ``--limit N``
takes about N/5 rows of every size (accuracy-vs-length from a small run).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.templating import load_template
from harness_ext.data.sources import FLENQA, FLENQA_FILE, alias_mark, allow_unofficial, fetch
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.metrics import flenqa_correct

# lm-eval task kind -> value of the `dataset` column
TASKS = {"monorel": "MonoRel", "pir": "PIR", "ruletaker": "Simplified RuleTaker"}
COLUMNS = (
    "global_sample_id",
    "sample_id",
    "label",
    "dataset",
    "facts",
    "rule",
    "statement",
    "assertion/question",
    "mixin",
    "padding_type",
    "dispersion",
    "ctx_size",
)
CTX_SIZES = (250, 500, 1000, 2000, 3000)
FIXTURE_KEY = b"needles_fixture"  # parquet schema metadata set by the fixture generator


# ---------------------------------------------------------------------------------- data
def read_table(path) -> tuple[list[dict], str | None]:
    """Rows of the parquet file and its fixture label (None for real data)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise NeedlesError(
            f"{path} is not FLenQA data: missing columns {missing}",
            fix="use the official file (see `needles data fetch flenqa`)",
        )
    meta = table.schema.metadata or {}
    label = meta[FIXTURE_KEY].decode() if FIXTURE_KEY in meta else None
    return table.to_pylist(), label


def _filter_values(metadata: dict, key: str, cast):
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    try:
        return {cast(v) for v in value}
    except (TypeError, ValueError):
        raise NeedlesError(f"--metadata {key}={value!r} is not a list", fix=f'e.g. "{key}": [250, 500]') from None


def order_rows(rows: list[dict], seed: int) -> list[dict]:
    """Interleave ctx sizes, each in seeded order: the first k*S rows hold k rows of each of S sizes."""
    by_size: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_size[int(row["ctx_size"])].append(row)
    for size_rows in by_size.values():
        size_rows.sort(key=lambda r: hashlib.sha256(f"{seed}\0{r['global_sample_id']}".encode()).hexdigest())
    sizes = sorted(by_size)
    longest = max((len(v) for v in by_size.values()), default=0)
    return [by_size[s][i] for i in range(longest) for s in sizes if i < len(by_size[s])]


def _doc(row: dict, template: str) -> dict:
    # Fields keep the dataset's names and values; `question` is the dataset's `assertion/question`.
    doc = {k: row[k] for k in COLUMNS if k != "assertion/question"}
    doc["question"] = row["assertion/question"]
    doc["label"] = str(row["label"])
    doc["ctx_size"] = int(row["ctx_size"])
    doc["prompt_template"] = template
    return doc


def flenqa_dataset(flenqa_task: str = "pir", flenqa_cot: bool = False, **metadata) -> datasets.DatasetDict:
    if flenqa_task not in TASKS:
        raise NeedlesError(f"unknown FLenQA task {flenqa_task!r}", fix=f"one of {sorted(TASKS)}")
    check_family_metadata("flenqa", metadata)
    try:
        seed = int(metadata.get("flenqa_order_seed", 0))
    except (TypeError, ValueError):
        raise NeedlesError(
            f"--metadata flenqa_order_seed={metadata.get('flenqa_order_seed')!r} is not an integer",
            fix='e.g. "flenqa_order_seed": 0',
        ) from None
    got = fetch(FLENQA, FLENQA_FILE, metadata)
    rows, fixture = read_table(got.path)
    official = got.official and fixture is None
    if not official and not allow_unofficial(metadata):
        raise NeedlesError(
            f"{got.path} is a fixture ({fixture}), not the FLenQA data",
            fix="opt in with --metadata '{\"allow_unofficial_data\": true}' for test runs",
        )
    label = got.label if fixture is None else fixture
    sizes = _filter_values(metadata, "flenqa_ctx_sizes", int)
    paddings = _filter_values(metadata, "flenqa_padding_types", str)
    dispersions = _filter_values(metadata, "flenqa_dispersions", str)
    rows = [
        r
        for r in rows
        if r["dataset"] == TASKS[flenqa_task]
        and (sizes is None or int(r["ctx_size"]) in sizes)
        and (paddings is None or r["padding_type"] in paddings)
        and (dispersions is None or r["dispersion"] in dispersions)
    ]
    if not rows:
        raise NeedlesError(
            f"no FLenQA {TASKS[flenqa_task]} rows match the metadata filters",
            fix="check flenqa_ctx_sizes / flenqa_padding_types / flenqa_dispersions",
        )
    template = f"flenqa/{flenqa_task}{'_cot' if flenqa_cot else ''}.jinja"
    docs = [_doc(r, template) for r in order_rows(rows, seed)]
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)})
    out.needles_info = {
        "needles_data_official": official,
        "needles_data_label": label,
        "needles_data_files": {got.relpath: got.sha256},
        "needles_data_origin": [got.origin],
        "needles_order": f"ctx sizes interleaved, each by sha256('{seed}\\0' + global_sample_id)",
        "needles_filters": {
            "ctx_sizes": sorted(sizes) if sizes else None,
            "padding_types": sorted(paddings) if paddings else None,
            "dispersions": sorted(dispersions) if dispersions else None,
        },
        "needles_prompt": template,
        "needles_alias_marks": [] if official else [alias_mark(label)],
    }
    return out


# ---------------------------------------------------------------------------------- prompt + score
def render_prompt(doc: dict) -> str:
    """The reference prompt, byte for byte. Fields go through ``str()`` as in the reference's f-strings."""
    return load_template(doc["prompt_template"]).render(
        question=str(doc["question"]), rule=str(doc["rule"]), mixin=str(doc["mixin"])
    )


def doc_to_text(doc: dict) -> str:
    return render_prompt(doc)


def doc_to_target(doc: dict) -> str:
    return doc["label"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    acc = flenqa_correct(results[0], doc["label"])
    # Three separate breakdowns, never combined: a padding type is a subset, not a length or position.
    scores = {"acc": acc, f"acc_pad_{doc['padding_type']}": acc}
    return {
        **scores,
        **with_breakdowns({"acc": acc}, [key_suffix("ctx", doc["ctx_size"])]),
        **with_breakdowns({"acc": acc}, [key_suffix("dispersion", doc["dispersion"])]),
    }
