"""``needles data ...``: fetch and verify official data, write offline mirrors, build test fixtures, list
task groups and (``needles data list families``) the data families and cells with their knobs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MDQA_SETTINGS = (10, 20, 30)
FAMILIES_VIEW = "families"  # `needles data list families`: the data families, not an lm-eval group


def _mdqa_files(documents: list[int]) -> list[str]:
    from harness_ext.tasklib.mdqa import OFFICIAL_GOLD_INDICES, ORACLE_FILE, official_path

    return [ORACLE_FILE] + [official_path(n, gi) for n in documents for gi in OFFICIAL_GOLD_INDICES[n]]


def _fetch(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.data.sources import FLENQA, FLENQA_FILE, LOST_IN_THE_MIDDLE, RETRIEVAL_HEAD, fetch, write_mirror

    check_output_dir(args.out, "mirror folder")
    plan = []
    if args.what in ("mdqa", "all"):
        plan.append((LOST_IN_THE_MIDDLE, _mdqa_files(args.documents)))
    if args.what in ("flenqa", "all"):
        plan.append((FLENQA, [FLENQA_FILE]))
    if args.what in ("niah", "all"):
        plan.append((RETRIEVAL_HEAD, list(RETRIEVAL_HEAD.files)))
    if args.what in ("musique", "all"):
        from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_DEV, MUSIQUE_TRAIN

        plan.append((MUSIQUE, [MUSIQUE_DEV] + ([MUSIQUE_TRAIN] if args.musique_train else [])))
    if args.what in ("summhay", "all"):
        from harness_ext.data.qa_sources import SUMMHAY

        plan.append((SUMMHAY, list(SUMMHAY.files)))
    for source, files in plan:
        if args.out:
            root = Path(args.out) / source.name
            for got in write_mirror(source, files, root):
                print(f"{got.sha256}  {root / got.relpath}")
            print(f"mirror written: use {source.mirror_env}={root}", file=sys.stderr)
        else:
            for rel in files:
                got = fetch(source, rel)
                print(f"{got.sha256}  {got.path}  ({got.origin})")
    if args.what in ("general", "all"):
        _fetch_general()
    return 0


def _fetch_general() -> None:
    import datasets

    from harness_ext.tasklib.general import hub_datasets

    pairs = hub_datasets(["needles_general"])
    for i, (path, name) in enumerate(pairs, start=1):
        print(f"[needles] {i}/{len(pairs)} {path}" + (f" ({name})" if name else ""), file=sys.stderr)
        datasets.load_dataset(path, name)


def _verify(args: argparse.Namespace) -> int:
    """0 when every file of the mirror is the pinned one; 1 when any is missing or differs; 2 when it is no mirror."""
    from harness_ext.core.errors import NeedlesError
    from harness_ext.data.qa_sources import MUSIQUE, SUMMHAY
    from harness_ext.data.sources import FLENQA, LOST_IN_THE_MIDDLE, RETRIEVAL_HEAD, fixture_label, mismatch

    source = {"mdqa": LOST_IN_THE_MIDDLE, "flenqa": FLENQA, "niah": RETRIEVAL_HEAD, "musique": MUSIQUE}.get(
        args.what, SUMMHAY
    )
    root = Path(args.mirror)
    files = _mdqa_files(args.documents) if args.what == "mdqa" else list(source.files)
    if args.what == "musique":  # the 241 MB train file is only needed for the real-data baseline
        files = [rel for rel in files if rel == "musique_ans_v1.0_dev.jsonl" or (root / rel).is_file()]
    fix = f"point --mirror at a folder written by `needles data fetch {args.what} --out DIR` (DIR/{source.name})"
    if not root.is_dir():
        raise NeedlesError(f"mirror {root} {'is a file' if root.exists() else 'does not exist'}", fix=fix)
    if not any((root / rel).is_file() for rel in files):
        raise NeedlesError(f"mirror {root} holds none of the {len(files)} {args.what} files", fix=fix)
    label = fixture_label(root)
    if label:
        print(f"{root} is a FIXTURE: {label}")
    bad = missing = 0
    for rel in files:
        entry, path = source.files[rel], root / rel
        if not path.is_file():
            status = "missing"
        elif not entry.pinned:
            status = "present (no published checksum; pinned by revision only)"
        elif mismatch(entry, path) is None:
            status = "OK"
        else:
            status, bad = "MISMATCH (not the official file)", bad + 1
        print(f"{status:<12}  {rel}")
        missing += status == "missing"
    if bad or missing:
        print(f"verification FAILED: {bad} mismatched, {missing} missing of {len(files)} files", file=sys.stderr)
    return 1 if bad or missing else 0


def _value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _list_families() -> int:
    """The data families and cells (one row each), what they are, and their knobs with defaults."""
    from harness_ext.finetune.families import describe_families

    rows = describe_families()
    print(f"{'family':<11} {'cell':<19} {'concept':<10} {'diversity':<10} {'--probes':<30} lm-eval task(s)")
    for r in rows:
        tasks = ", ".join(r["tasks"])
        print(
            f"{r['family']:<11} {r['cell'] or '-':<19} {r['concept']:<10} {r['diversity']:<10} {r['probe']:<30} {tasks}"
        )
    print()
    for r in rows:
        print(f"{r['cell'] or r['family']}: {r['summary']}")
    for family in dict.fromkeys(r["family"] for r in rows):
        knobs: dict[str, dict] = {}
        for r in (r for r in rows if r["family"] == family):
            for k in r["knobs"]:
                knobs.setdefault(k["key"], k)
        cell = " cell: CELL," if family != "kv" else ""
        print(f"\nknobs of {family} (finetune YAML `data: {{family: {family},{cell} KEY: VALUE}}` or the flag;")
        print("lm-eval: --metadata KEY; defaults for training / evaluation):")
        print(f"  {'data key':<20} {'flag':<22} {'--metadata key':<26} {'train':<12} {'eval':<28} cells")
        for k in knobs.values():
            cells = "all" if family == "kv" or len(k["cells"]) == sum(r["family"] == family for r in rows) else ""
            cells = cells or ", ".join(k["cells"])
            train, evaluate = _value(k["train_default"]), _value(k["eval_default"])
            print(f"  {k['key']:<20} {k['flag']:<22} {k['metadata']:<26} {train:<12} {evaluate:<28} {cells}")
    print("\nsynth_mdqa trains on the train split and evaluates on the eval split (same seed, disjoint data).")
    print(
        f"{len(rows)} cells in {len(set(r['family'] for r in rows))} families; train on one with "
        "`needles finetune --data-family F --data-cell C`, score on any with `lm_eval --tasks T`",
        file=sys.stderr,
    )
    return 0


def _list_general(args: argparse.Namespace) -> int:
    if args.group == FAMILIES_VIEW:
        return _list_families()
    from harness_ext.tasklib.general import resolve_leaf_configs

    leaves, groups = resolve_leaf_configs([args.group])
    print(f"{'task':<45} {'shots':>5}  {'version':>7}  dataset")
    for name in sorted(leaves):
        cfg = leaves[name]
        dataset = f"{cfg.get('dataset_path') or '(generated)'}" + (
            f" [{cfg['dataset_name']}]" if cfg.get("dataset_name") else ""
        )
        version = (cfg.get("metadata") or {}).get("version", "")
        print(f"{name:<45} {cfg.get('num_fewshot') or 0:>5}  {version!s:>7}  {dataset}")
    print(f"{len(leaves)} tasks in {len(groups)} groups", file=sys.stderr)
    return 0


def _mdqa_fixture(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.data.sources import LOST_IN_THE_MIDDLE, fetch
    from harness_ext.tasklib.mdqa import ORACLE_FILE
    from harness_ext.tasklib.mdqa_fixture import build_fixture

    check_output_dir(args.out, "fixture folder")
    oracle = Path(args.oracle) if args.oracle else fetch(LOST_IN_THE_MIDDLE, ORACLE_FILE).path
    marker = build_fixture(
        oracle, Path(args.out), seed=args.seed, settings=tuple(args.documents), num_questions=args.num_questions
    )
    print(
        f"wrote an MDQA FIXTURE ({marker['num_questions']} questions) to {args.out}; use it with "
        f"NEEDLES_MDQA_MIRROR={args.out} and --metadata '{{\"allow_unofficial_data\": true}}'",
        file=sys.stderr,
    )
    return 0


def _flenqa_fixture(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.tasklib.flenqa_fixture import build_rows, write_fixture

    check_output_dir(args.out, "fixture folder")
    build_rows(tuple(args.ctx_sizes), args.instances, args.seed)  # validates before anything is written
    path = write_fixture(Path(args.out), tuple(args.ctx_sizes), args.instances, args.seed)
    print(
        f"wrote a FLenQA FIXTURE to {path}; use it with NEEDLES_FLENQA_MIRROR={args.out} and "
        "--metadata '{\"allow_unofficial_data\": true}'",
        file=sys.stderr,
    )
    return 0


def _qa_fixture(args: argparse.Namespace) -> int:
    from harness_ext.core.errors import NeedlesError
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.data.qa_sources import MUSIQUE, SUMMHAY
    from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture

    musique = args.data_command == "musique-fixture"
    least = 1 if musique else 6  # a SummHay fixture states each insight in up to 4 of its documents
    if args.size is not None and args.size < least:
        raise NeedlesError(f"--size {args.size} is below {least}", fix=f"use --size {least} or more")
    if args.seed < 0:
        raise NeedlesError(f"--seed {args.seed} is negative", fix="use a seed of 0 or more")
    check_output_dir(args.out, "fixture folder")
    if musique:
        write_musique_fixture(Path(args.out), args.size or 24, args.seed)
    else:
        write_summhay_fixture(Path(args.out), args.size or 16, args.seed)
    source = MUSIQUE if args.data_command == "musique-fixture" else SUMMHAY
    print(
        f"wrote a {source.name} FIXTURE to {args.out}; use it with {source.mirror_env}={args.out} and "
        "--metadata '{\"allow_unofficial_data\": true}'",
        file=sys.stderr,
    )
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="official data for MDQA/FLenQA/NIAH/general benchmarks: fetch, verify, fixtures")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("fetch", help="download and verify official data into the cache (or a mirror with --out)")
    p.add_argument("what", choices=["mdqa", "flenqa", "niah", "musique", "summhay", "general", "all"])
    p.add_argument(
        "--documents",
        type=int,
        nargs="+",
        choices=MDQA_SETTINGS,
        default=[20],
        help="MDQA settings to fetch (default 20); the oracle file is always fetched",
    )
    p.add_argument(
        "--out", help="write an offline mirror here (<out>/lost-in-the-middle, <out>/flenqa, <out>/retrieval-head, ...)"
    )
    p.add_argument(
        "--musique-train", action="store_true", help="MuSiQue: also the 241 MB train file (real-data baseline pool)"
    )
    p.set_defaults(func=_fetch)

    p = dsub.add_parser("verify", help="check a mirror folder against the pinned checksums")
    p.add_argument("what", choices=["mdqa", "flenqa", "niah", "musique", "summhay"])
    p.add_argument("--mirror", required=True)
    p.add_argument(
        "--documents",
        type=int,
        nargs="+",
        choices=MDQA_SETTINGS,
        default=[20],
        help="MDQA settings the mirror must hold (default 20, as `data fetch`); the oracle file always",
    )
    p.set_defaults(func=_verify)

    p = dsub.add_parser(
        "list",
        help="show the tasks, shots and datasets a group resolves to (no download); "
        "`list families`: the data families and cells with their knobs",
    )
    p.add_argument(
        "group",
        nargs="?",
        default="needles_general",
        help=f"an lm-eval group (default needles_general), or {FAMILIES_VIEW!r}: the synthetic/real data grid",
    )
    p.set_defaults(func=_list_general)

    p = dsub.add_parser("mdqa-fixture", help="build a labelled MDQA FIXTURE mirror from the real oracle file")
    p.add_argument("--out", required=True)
    p.add_argument("--oracle", help="nq-open-oracle.jsonl.gz (default: the official file, fetched and verified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--documents", type=int, nargs="+", choices=MDQA_SETTINGS, default=[20])
    p.add_argument("--num-questions", type=int, help="keep the first N questions (default: all 2,655)")
    p.set_defaults(func=_mdqa_fixture)

    for name, size in (("musique-fixture", "questions (default 24)"), ("summhay-fixture", "documents (default 16)")):
        p = dsub.add_parser(name, help=f"write a labelled {name.split('-')[0]} FIXTURE in the official file format")
        p.add_argument("--out", required=True)
        p.add_argument("--size", type=int, help=f"number of {size}")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=_qa_fixture)

    p = dsub.add_parser("flenqa-fixture", help="write a small labelled FLenQA FIXTURE in the dataset's schema")
    p.add_argument("--out", required=True)
    p.add_argument("--ctx-sizes", type=int, nargs="+", default=[250, 500, 1000])
    p.add_argument("--instances", type=int, default=4, help="base instances per task (labels alternate)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_flenqa_fixture)
